"""Input embeddings shared by paradigms: class labels with a null class for classifier-free guidance,
diffusion timesteps, and learned or fixed positions."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from isynth.conditions import Conditions
from isynth.flops import matmul_flops


class ClassEmbedding(nn.Module):
    """Embedding of class ids as the sum of one embedding per attribute (`isynth.conditions`), each attribute
    with its own null entry; the null class (id num_classes) is every attribute null.

    During training each attribute is replaced by its null entry with probability `dropout`, independently,
    so the same network also models p(x) and every partial condition (Ho & Salimans 2022 for one
    attribute); sampling uses the null class for the unconditional half of the doubled batch. With one
    attribute (labelled data) this is one table of num_classes + 1 rows.
    """

    def __init__(self, conditions: Conditions, width: int, dropout: float, init_std: float | None = 0.02):
        super().__init__()
        self.num_classes, self.dropout, self.sizes = conditions.num_classes, dropout, conditions.sizes
        self.tables = nn.ModuleList(nn.Embedding(size + 1, width) for size in self.sizes)
        if init_std is not None:  # else PyTorch's N(0, 1)
            for table in self.tables:
                nn.init.trunc_normal_(table.weight, std=init_std)
        # (num_classes + 1, K): the attributes of every class id; the last row, the null class, is every
        # attribute's null entry. from_numpy: a CPU tensor also under torch.device("meta") (`isynth flops`).
        attrs = np.concatenate([conditions.class_attrs(), np.array([self.sizes], dtype=np.int64)])
        self.register_buffer("attrs", torch.from_numpy(attrs), persistent=False)

    @property
    def null(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor, null_vector: Tensor | None = None) -> Tensor:
        """(B,) class ids -> (B, C). `null_vector` (C,), if given, stands for the null class: eMIGM makes the
        mask token the null condition (You et al. 2025, sec. 3.2), one shared parameter."""
        attrs = self.attrs[labels]  # (B, K)
        if self.training and self.dropout > 0:
            drop = torch.rand(attrs.shape, device=labels.device) < self.dropout  # (B, K)
            attrs = torch.where(drop, self.attrs[self.null], attrs)
        emb = self.tables[0](attrs[:, 0])  # (B, C)
        for k in range(1, len(self.tables)):
            emb = emb + self.tables[k](attrs[:, k])
        if null_vector is not None:
            emb = torch.where((attrs == self.attrs[self.null]).all(1, keepdim=True), null_vector, emb)
        return emb


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (N, dim) of timesteps t (N,), cos then sin (Transformer positions; DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: sinusoidal features of t, then Linear-SiLU-Linear to the model width."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.width, self.freq_dim = width, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """t (N,) in the units of the training timesteps (0..1000) -> (N, width)."""
        return self.mlp(timestep_features(t, self.freq_dim).to(dtype))

    def flops(self, rows: int | float, train: bool = False) -> int | float:
        """The two Linears on `rows` timesteps; the first reads fixed features (no input gradient)."""
        w = self.width
        return matmul_flops(rows, self.freq_dim, w, train, input_grad=False) + matmul_flops(rows, w, w, train)


def learned_positions(num: int, width: int) -> nn.Parameter:
    """A learned position table (1, num, width), initialised like ViT/GPT-2."""
    p = nn.Parameter(torch.zeros(1, num, width))
    nn.init.trunc_normal_(p, std=0.02)
    return p


def sincos_positions(grid: tuple[int, int], width: int) -> Tensor:
    """Fixed 2-D sine-cosine positions (1, h*w, width) in raster order (MAE, He et al. 2022; GET): half the
    channels encode the row, half the column, each as sin and cos at geometric frequencies."""
    if width % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {width}")
    h, w = grid
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (W/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        args = pos.reshape(-1, 1) * freqs[None]  # (h*w, W/4)
        return torch.cat([args.sin(), args.cos()], dim=1)  # (h*w, W/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()[None]  # (1, h*w, W)
