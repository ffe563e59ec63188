"""Token inputs and outputs: how a paradigm reads tokens into the backbone and models one token out of it.

The tokenizer decides: discrete ids are embedded by a table and modelled by a softmax (`CategoricalHead`);
continuous vectors are projected by a Linear and modelled by MAR's per-token diffusion head
(`isynth.diffhead.DiffusionHead`). Both heads share one contract (loss per token, sample with CFG, FLOPs)
and each has its own sampling section, `sample.head`, so Fluid's {discrete, continuous} axis (Fan et al.
2024) is the tokenizer setting, not a second code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.config import check
from isynth.diffhead import DiffHeadConfig, DiffHeadSampling, DiffusionHead
from isynth.flops import matmul_flops
from isynth.guidance import guide
from isynth.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class CategoricalSampling:
    """How a discrete token is drawn from the softmax head."""

    temperature: float = 1.0      # divides the logits
    top_k: int = 0                # keep the k most likely ids; 0 = off
    top_p: float = 1.0            # keep the smallest set of ids whose probability reaches p; 1 = off

    def __post_init__(self):
        check(self.temperature > 0, "sample.head.temperature must be > 0")
        check(self.top_k >= 0, "sample.head.top_k must be >= 0")
        check(0 < self.top_p <= 1, "sample.head.top_p must be in (0, 1]")


TokenSampling = CategoricalSampling | DiffHeadSampling  # `sample.head`, by the tokenizer's family


def head_sections(discrete: bool, sampling: DiffHeadSampling | None = None
                  ) -> tuple[DiffHeadConfig | None, TokenSampling]:
    """(method.head, sample.head) of a token paradigm: no settings and the categorical draw for discrete
    tokens; the diffusion head and its sampler (default: `sampling`, else MAR's) for continuous ones."""
    if discrete:
        return None, CategoricalSampling()
    return DiffHeadConfig(), sampling or DiffHeadSampling()


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p (nucleus)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the first token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Sample ids from softmax(logits / T) by inverting the CDF with one uniform per row.

    One uniform per row (rather than torch.multinomial) makes the draw a function of the generator
    state alone, so two numerically identical logit tensors give the same ids (KV cache vs none).
    """
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device)
    ids = torch.searchsorted(probs.cumsum(-1), u, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


class CategoricalHead(nn.Module):
    """Linear to logits over the codebook; cross-entropy loss, guided and filtered categorical draw."""

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

    def sample(self, h: Tensor, sampling: CategoricalSampling, cfg_weight: float | None,
               generator: torch.Generator | None) -> Tensor:
        """h (B, C), or (2B, C) [conditional; unconditional] when cfg_weight is given -> ids (B,)."""
        logits = self.proj(h).float()
        if cfg_weight is not None:
            b = h.shape[0] // 2
            logits = guide(logits[:b], logits[b:], cfg_weight)
        return draw(filter_logits(logits, sampling.top_k, sampling.top_p), sampling.temperature, generator)

    def train_flops(self, num_tokens: float) -> float:
        return matmul_flops(num_tokens, self.width, self.vocab_size, train=True)

    def sample_flops(self, num_tokens: float, sampling: CategoricalSampling, cfg: bool) -> float:
        return (2 if cfg else 1) * matmul_flops(num_tokens, self.width, self.vocab_size)


Head = CategoricalHead | DiffusionHead


def build_head(tokenizer: Tokenizer, width: int, config: DiffHeadConfig | None) -> Head:
    if tokenizer.discrete:
        return CategoricalHead(width, tokenizer.vocab_size)
    if config is None:
        raise ValueError("continuous tokens need the diffusion head's section (method.head)")
    return DiffusionHead(width, tokenizer.token_dim, config)


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
        """A table lookup costs no matmul; the Linear reads data, so its backward is the weight gradient only."""
        if self.discrete:
            return 0
        return matmul_flops(num_tokens, self.token_dim, self.width, train, input_grad=False)


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
