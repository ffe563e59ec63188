"""MaskGIT (`maskgit`; Chang et al. 2022; masked-token prediction in Kilian et al. 2024): masked token modelling with
confidence-ordered parallel decoding over discrete tokens.

Training: t ~ U(0, 1) per sample, ceil(N * gamma(t)) tokens masked uniformly (gamma cosine by default),
cross-entropy on the masked tokens, one bidirectional transformer with mask tokens in its input.
Sampling: K steps; each predicts every masked token, draws them, and keeps the most confident, where
confidence = log p(drawn token) + choice_temperature * (1 - (k+1)/K) * Gumbel noise, so that
floor(N * gamma(1 - (k+1)/K)) tokens stay masked. Optional CFG, linear in the revealed fraction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from isynth.config import check
from isynth.guidance import Guidance, guide
from isynth.heads import CategoricalSampling, draw, filter_logits
from isynth.masking import MaskSchedule, inverse_mask_fraction, mask_fraction, random_masks
from isynth.paradigms.masked import MaskedParadigm, check_masked_net


@dataclass(frozen=True)
class MaskGITConfig:
    mask_schedule: MaskSchedule = "cosine"  # the mask ratio law gamma(t) (MaskGIT: cosine)
    class_dropout: float = 0.1              # label -> null class during training, for CFG (MAR's "fake latent": 0.1)
    num_buffer: int = 1                     # class "buffer" tokens before the grid (MaskGIT: 1)
    mae: bool = False                       # the encoder sees visible tokens only (MAE, He et al. 2022)
    decoder_depth: int | None = 0           # blocks of a decoder that fills mask tokens; 0: none (MaskGIT)
    null_is_mask_token: bool = False        # the null condition for CFG is the mask token (eMIGM)

    def __post_init__(self):
        check_masked_net(self)


@dataclass(frozen=True)
class MaskGITSampling:
    num_steps: int = 8                # MaskGIT's ImageNet-256 setting (8-16 typical)
    choice_temperature: float = 4.5   # Gumbel noise on the confidence, annealed linearly to 0
    head: CategoricalSampling = field(default_factory=CategoricalSampling)
    guidance: Guidance = field(default_factory=lambda: Guidance(schedule="linear"))  # progress: revealed / N
    batch_size: int = 256                   # images per sampling batch
    cuda_graphs: bool = True          # replay each step's network call from a CUDA graph (on CUDA; isynth.graphs)

    def __post_init__(self):
        check(self.num_steps >= 1, "sample.num_steps must be >= 1")
        check(self.choice_temperature >= 0, "sample.choice_temperature must be >= 0")
        check(self.batch_size > 0, "sample.batch_size must be > 0")


class MaskGIT(MaskedParadigm):
    name = "maskgit"
    discrete = True  # confidence needs token probabilities

    @classmethod
    def sections(cls, discrete: bool) -> tuple[MaskGITConfig, MaskGITSampling]:
        return MaskGITConfig(), MaskGITSampling()

    @property
    def sampling_schedule(self) -> MaskSchedule:
        return self.run.method.mask_schedule

    def training_mask(self, batch: int, device) -> tuple[Tensor, Tensor]:
        # One t per sample; one per batch with the MAE encoder, which needs equal visible counts per row.
        t = torch.rand(1 if self.run.method.mae else batch, device=device).expand(batch)
        gamma = mask_fraction(self.run.method.mask_schedule, t)
        counts = torch.ceil(self.seq_len * gamma).long().clamp(1, self.seq_len)
        return random_masks(counts, self.seq_len), torch.ones(batch, device=device)

    def train_count_pmf(self) -> Tensor:
        # ceil(N gamma(t)) = m  <=>  gamma^-1((m-1)/N) < t <= gamma^-1(m/N), t uniform.
        edges = inverse_mask_fraction(self.run.method.mask_schedule,
                                      torch.arange(self.seq_len + 1, dtype=torch.float64) / self.seq_len)
        return torch.cat([torch.zeros(1, dtype=torch.float64), edges[1:] - edges[:-1]])

    def reveal(self, k, z, w, mask, ranks, counts, s, generator):
        """Draw every masked token, keep the m_k - m_{k+1} most confident (MaskGIT sec. 3.2)."""
        b = mask.shape[0]
        zm = z[torch.cat([mask, mask])] if w is not None else z[mask]  # (R * m_k, C)
        logits = self.head.logits(zm).float()
        if w is not None:
            logits = guide(logits[: logits.shape[0] // 2], logits[logits.shape[0] // 2:], w)
        logits = filter_logits(logits, s.head.top_k, s.head.top_p) / s.head.temperature
        ids = draw(logits, 1.0, generator)  # (B * m_k,)
        conf = torch.full(mask.shape, math.inf, device=z.device)
        logp = logits.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
        u = torch.rand(logp.shape, generator=generator, device=z.device).clamp_(1e-20, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        conf[mask] = logp + s.choice_temperature * (1 - (k + 1) / s.num_steps) * gumbel
        # The m_{k+1} least confident stay masked (revealed tokens have +inf confidence).
        stay = conf.argsort(1).argsort(1) < counts[k + 1]  # (B, N)
        reveal = mask & ~stay
        chosen = torch.zeros(b, self.seq_len, dtype=torch.long, device=z.device)
        chosen[mask] = ids
        return reveal, chosen[reveal]

    def head_sample_flops(self, k, counts, s, cfg):
        return self.head.sample_flops(counts[k], s.head, cfg)  # logits for every masked token (no per-call work)
