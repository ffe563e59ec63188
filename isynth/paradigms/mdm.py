"""Masked diffusion in eMIGM's design space (`mdm`; You et al. 2025, "Effective and Efficient Masked Image
Generation Models").

Every choice of the paper's Table 1 is configuration of the shared masked model (`masked.py`):
- masking distribution: one t ~ U(0, 1) per batch, clamped to t >= t_min (time truncation, sec. 3.3),
  p = (1 - 1e-3) t + 1e-3, each token masked with probability gamma(p) -- one Binomial(N, gamma(p)) count
  per batch, at least 2, so the MAE encoder's rows stay rectangular (reference code);
- weighting: w = 1 (the paper's choice) or the MDM ELBO weight gamma'(p)/gamma(p);
- conditional distribution: softmax for discrete tokens, the diffusion head (DPM-Solver++) for continuous;
- the MAE encoder over visible tokens (switchable), the mask token as CFG's null condition, CFG only on a
  time interval, and K sampling steps on linspace(1, 1e-5, K+1) where a masked token is revealed with
  probability 1 - gamma(s)/gamma(t): the count per step is fixed at its expectation (the same for every
  row, as the reference coordinates it), which positions is uniform at random.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from isynth.config import TokenizerConfig, check
from isynth.diffhead import DiffHeadConfig, DiffHeadSampling
from isynth.heads import head_sections
from isynth.masking import MaskSchedule, elbo_weight, mask_fraction, random_masks
from isynth.paradigms.masked import MaskedParadigm, MaskedSampling, check_masked_net

_P_MIN = 1e-3  # p = (1 - 1e-3) t + 1e-3 keeps gamma(p) > 0


@dataclass(frozen=True)
class MDMConfig:
    mask_schedule: MaskSchedule = "exp"          # every released eMIGM script: exp
    weighting: Literal["none", "elbo"] = "none"  # w = 1, or gamma'/gamma
    t_min: float = 0.2                           # time truncation: t = max(t, t_min)
    class_dropout: float = 0.1              # label -> null class during training, for CFG (MAR's "fake latent": 0.1)
    num_buffer: int = 64                    # class "buffer" tokens before the grid (MAR: 64)
    mae: bool = True                        # the encoder sees visible tokens only (MAE, He et al. 2022)
    decoder_depth: int | None = None        # blocks of the decoder that fills mask tokens; none: as deep as the encoder
    null_is_mask_token: bool = True         # the null condition for CFG is the mask token (eMIGM)
    head: DiffHeadConfig | None = None           # the diffusion head, with continuous tokens

    def __post_init__(self):
        check_masked_net(self)
        check(0 <= self.t_min < 1, f"method.t_min must be in [0, 1), got {self.t_min}")


class MDM(MaskedParadigm):
    name = "mdm"
    discrete = None  # categorical or diffusion head, by the tokenizer
    default_tokenizer = TokenizerConfig(kind="patch", patch_size=1)
    time_end = 1e-5

    @classmethod
    def sections(cls, discrete: bool) -> tuple[MDMConfig, MaskedSampling]:
        # Released eMIGM sampling: 16 steps, 8 DPM-Solver++ head steps (14 for 128 steps), constant CFG.
        head, head_sampling = head_sections(discrete, DiffHeadSampling(sampler="dpm++", steps=8))
        return MDMConfig(head=head), MaskedSampling(num_steps=16, head=head_sampling)

    def __init__(self, run, tokenizer, conditions):
        super().__init__(run, tokenizer, conditions)
        check(self.seq_len >= 2, "mdm masks at least 2 tokens per sample: the token grid needs >= 2 tokens")

    @property
    def sampling_schedule(self) -> MaskSchedule:
        return self.run.method.mask_schedule

    def _p(self, t: Tensor) -> Tensor:
        return (1 - _P_MIN) * t.clamp(min=self.run.method.t_min) + _P_MIN

    def training_mask(self, batch: int, device) -> tuple[Tensor, Tensor]:
        m = self.run.method
        p = self._p(torch.rand(1, device=device))
        gamma = mask_fraction(m.mask_schedule, p)
        count = torch.binomial(torch.full_like(gamma, float(self.seq_len)), gamma).long().clamp(2, self.seq_len)
        weight = elbo_weight(m.mask_schedule, p) if m.weighting == "elbo" else torch.ones_like(p)
        return random_masks(count.expand(batch), self.seq_len), weight.expand(batch)

    def train_count_pmf(self, grid: int = 4096) -> Tensor:
        """P(m masked): the Binomial(N, gamma(p(t))) mixture over t (midpoint rule on (t_min, 1), plus the
        clamp's point mass t_min at t = t_min), with counts below 2 raised to 2."""
        n, t_min = self.seq_len, self.run.method.t_min
        t = t_min + (torch.arange(grid, dtype=torch.float64) + 0.5) * (1 - t_min) / grid
        weights = torch.full((grid,), (1 - t_min) / grid, dtype=torch.float64)
        if t_min > 0:
            point = torch.tensor([t_min], dtype=torch.float64)
            t, weights = torch.cat([t, point]), torch.cat([weights, point])
        gamma = mask_fraction(self.run.method.mask_schedule, self._p(t)).clamp(1e-12, 1 - 1e-12)
        m = torch.arange(n + 1, dtype=torch.float64)
        log_pmf = torch.distributions.Binomial(n, probs=gamma[:, None]).log_prob(m[None])  # (grid, N + 1)
        pmf = (weights[:, None] * log_pmf.exp()).sum(0)
        pmf[2] += pmf[:2].sum()
        pmf[:2] = 0
        return pmf / pmf.sum()
