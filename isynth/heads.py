"""Token inputs and outputs: how a paradigm reads tokens into the backbone and models one token out of it.

The tokenizer decides: discrete ids are embedded by a table and modelled by a softmax (`CategoricalHead`);
continuous vectors are projected by a Linear and modelled by MAR's per-token diffusion head
(`isynth.diffhead.DiffusionHead`). Both heads share one contract (loss per token, sample with CFG, FLOPs),
so Fluid's {discrete, continuous} axis is the tokenizer setting, not a second code path (seed 002).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.config import check
from isynth.diffhead import DiffHeadConfig, DiffHeadSampling, DiffusionHead
from isynth.guidance import draw, filter_logits, guide
from isynth.tokenizers import Tokenizer


@dataclass(frozen=True)
class TokenSampling(DiffHeadSampling):
    """How one token is drawn from a head; paradigms' sampling configs inherit these fields.

    temperature divides the logits (categorical) or scales the DDPM noise (diffusion head, MAR);
    top_k / top_p filter logits (categorical only); head_* pick the diffusion head's sampler.
    """

    temperature: float = 1.0
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off

    def __post_init__(self):
        super().__post_init__()
        check(self.temperature > 0, "sample.temperature must be > 0")
        check(self.top_k >= 0, "sample.top_k must be >= 0")
        check(0 < self.top_p <= 1, "sample.top_p must be in (0, 1]")


class CategoricalHead(nn.Module):
    """Linear to logits over the codebook; cross-entropy loss, guided and filtered categorical draw."""

    discrete = True

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.width, self.vocab_size = width, vocab_size
        self.proj = nn.Linear(width, vocab_size)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def logits(self, h: Tensor) -> Tensor:
        return self.proj(h)

    def loss(self, h: Tensor, target: Tensor) -> Tensor:
        """h (M, C), target (M,) ids -> per-token cross-entropy (M,)."""
        return F.cross_entropy(self.proj(h), target, reduction="none")

    def sample(self, h: Tensor, sampling: TokenSampling, cfg_weight: float | None,
               generator: torch.Generator | None) -> Tensor:
        """h (B, C), or (2B, C) [conditional; unconditional] when cfg_weight is given -> ids (B,)."""
        logits = self.proj(h).float()
        if cfg_weight is not None:
            b = h.shape[0] // 2
            logits = guide(logits[:b], logits[b:], cfg_weight)
        return draw(filter_logits(logits, sampling.top_k, sampling.top_p), sampling.temperature, generator)

    def train_flops(self, num_tokens: float) -> float:
        return 3 * 2 * num_tokens * self.width * self.vocab_size  # backward = 2x forward

    def sample_flops(self, num_tokens: float, sampling: TokenSampling, cfg: bool) -> float:
        return (2 if cfg else 1) * 2 * num_tokens * self.width * self.vocab_size

    def num_evals(self, sampling: TokenSampling) -> int:
        return 1


Head = CategoricalHead | DiffusionHead


def build_head(tokenizer: Tokenizer, width: int, method: DiffHeadConfig) -> Head:
    if tokenizer.discrete:
        return CategoricalHead(width, tokenizer.vocab_size)
    return DiffusionHead(width, tokenizer.token_dim, method)


class TokenInput(nn.Module):
    """Discrete ids -> embedding table; continuous vectors (.., D) -> Linear(D, C) (MAR's z_proj)."""

    def __init__(self, tokenizer: Tokenizer, width: int):
        super().__init__()
        self.discrete, self.width, self.token_dim = tokenizer.discrete, width, tokenizer.token_dim
        if self.discrete:
            self.embed = nn.Embedding(tokenizer.vocab_size, width)
            nn.init.trunc_normal_(self.embed.weight, std=0.02)
        else:
            self.embed = nn.Linear(tokenizer.token_dim, width)
            nn.init.trunc_normal_(self.embed.weight, std=0.02)
            nn.init.zeros_(self.embed.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.embed(tokens)  # (B, T) ids or (B, T, D) vectors -> (B, T, C)

    def flops(self, num_tokens: float, train: bool = False) -> float:
        """A table lookup costs no matmul; the Linear's backward is its weight gradient only (the tokens
        are data), so training costs 2x forward."""
        if self.discrete:
            return 0
        return (2 if train else 1) * 2 * num_tokens * self.token_dim * self.width


def gather_tokens(tokens: Tensor, idx: Tensor) -> Tensor:
    """tokens (B, N) or (B, N, D) -> the positions idx (B, T) of each row: (B, T) or (B, T, D)."""
    if tokens.ndim == 2:
        return torch.gather(tokens, 1, idx)
    return torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))


def empty_tokens(tokenizer: Tokenizer, batch: int, device) -> Tensor:
    """A zero token grid to fill in: (B, N) ids or (B, N, D) vectors."""
    if tokenizer.discrete:
        return torch.zeros(batch, tokenizer.seq_len, dtype=torch.long, device=device)
    return torch.zeros(batch, tokenizer.seq_len, tokenizer.token_dim, device=device)
