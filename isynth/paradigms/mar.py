"""MAR, masked autoregression (`mar`; Li et al. 2024, "Autoregressive Image Generation without Vector
Quantization"; Fluid's random-order models, Fan et al. 2024). Continuous tokens by default (the diffusion
head); with a discrete tokenizer the same random order, mask-ratio law and sampler drive a softmax head:
Fluid's random-order discrete cell, which differs from the continuous one only in the token head.

Training: a random order per sample; one mask ratio per batch from a truncated normal on [0.7, 1]
(mean 1, std 0.25), ceil(N * ratio) tokens masked; the MAE encoder sees the visible tokens plus class
buffer tokens, the decoder fills in mask tokens, and the per-token diffusion head models each masked token
given the decoder's output (diffusion loss). Sampling: K steps in a random order, floor(N cos(pi/2 (k+1)/K))
tokens still masked after step k, CFG inside the head with MAR's linear schedule (or constant).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from isynth.config import TokenizerConfig, check
from isynth.diffhead import DiffHeadConfig
from isynth.guidance import Guidance
from isynth.heads import head_sections
from isynth.masking import MaskSchedule, random_masks
from isynth.paradigms.masked import MaskedParadigm, MaskedSampling, check_masked_net


@dataclass(frozen=True)
class MARConfig:
    mask_ratio_min: float = 0.7   # truncated normal on [mask_ratio_min, 1] ...
    mask_ratio_mean: float = 1.0  # ... with this mean and std (MAR reference)
    mask_ratio_std: float = 0.25            # truncated-normal mask ratio: standard deviation (MAR)
    class_dropout: float = 0.1              # label -> null class during training, for CFG (MAR's "fake latent": 0.1)
    num_buffer: int = 64                    # class "buffer" tokens before the grid (MAR: 64)
    mae: bool = True                        # the encoder sees visible tokens only (MAE, He et al. 2022)
    decoder_depth: int | None = None        # blocks of the decoder that fills mask tokens; none: as deep as the encoder
    null_is_mask_token: bool = False        # the null condition for CFG is the mask token (eMIGM)
    head: DiffHeadConfig | None = field(default_factory=DiffHeadConfig)  # None with discrete tokens

    def __post_init__(self):
        check_masked_net(self)
        check(0 < self.mask_ratio_min < 1, "method.mask_ratio_min must be in (0, 1)")
        check(self.mask_ratio_std > 0, "method.mask_ratio_std must be > 0")


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


class MAR(MaskedParadigm):
    name = "mar"
    discrete = None  # the diffusion head for vectors, a softmax for ids
    default_tokenizer = TokenizerConfig(kind="patch", patch_size=1)

    @classmethod
    def sections(cls, discrete: bool) -> tuple[MARConfig, MaskedSampling]:
        # MAR's default sampling: 64 steps (256 in the paper's best runs), linear CFG, 100 DDPM head steps.
        head, head_sampling = head_sections(discrete)
        return MARConfig(head=head), MaskedSampling(num_steps=64, head=head_sampling,
                                                    guidance=Guidance(schedule="linear"))

    @property
    def sampling_schedule(self) -> MaskSchedule:
        return "cosine"  # masked fraction cos(pi/2 * k/K) = gamma_cosine(1 - k/K)

    def training_mask(self, batch: int, device) -> tuple[Tensor, Tensor]:
        m = self.run.method
        ratio = torch.nn.init.trunc_normal_(torch.empty(1, device=device), m.mask_ratio_mean, m.mask_ratio_std,
                                            m.mask_ratio_min, 1.0)
        count = torch.ceil(self.seq_len * ratio).long().clamp(1, self.seq_len)
        return random_masks(count.expand(batch), self.seq_len), torch.ones(batch, device=device)

    def train_count_pmf(self) -> Tensor:
        # ceil(N r) = m  <=>  (m-1)/N < r <= m/N, with r's truncated-normal CDF.
        m = self.run.method
        edges = torch.arange(self.seq_len + 1, dtype=torch.float64) / self.seq_len
        lo, hi = (torch.tensor([m.mask_ratio_min, 1.0], dtype=torch.float64) - m.mask_ratio_mean) / m.mask_ratio_std
        cdf = (_normal_cdf((edges.clamp(m.mask_ratio_min, 1) - m.mask_ratio_mean) / m.mask_ratio_std)
               - _normal_cdf(lo)) / (_normal_cdf(hi) - _normal_cdf(lo))
        return torch.cat([torch.zeros(1, dtype=torch.float64), cdf[1:] - cdf[:-1]]).clamp(min=0)
