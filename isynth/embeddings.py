"""Input embeddings shared by paradigms: class labels with a null class for classifier-free guidance,
diffusion timesteps, and learned or fixed positions."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from isynth.flops import matmul_flops


class ClassEmbedding(nn.Module):
    """Embedding of `num_classes` labels plus one null label (index num_classes) for CFG.

    During training, labels are replaced by the null label with probability `dropout` so the same
    network also models p(x) (Ho & Salimans 2022); sampling uses the null label for the unconditional
    half of the doubled batch.
    """

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.trunc_normal_(self.table.weight, std=0.02)

    @property
    def null(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor, null_vector: Tensor | None = None) -> Tensor:
        """(B,) labels -> (B, C). `null_vector` (C,), if given, stands for the null label: eMIGM makes the
        mask token the null condition (You et al. 2025, sec. 3.2), one shared parameter."""
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.null), labels)
        emb = self.table(labels)  # (B, C)
        if null_vector is not None:
            emb = torch.where((labels == self.null)[:, None], null_vector, emb)
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
