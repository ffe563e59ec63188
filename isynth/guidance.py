"""Classifier-free guidance (Ho & Salimans 2022): one `Guidance` value that every guided sampler carries as
`sample.guidance`, and the mixing rule uncond + w * (cond - uncond).

A schedule maps sampling progress p in [0, 1] to the weight w. What p counts is the sampler's to say:
tokens generated before the step for next-token prediction (RAR's pow-cosine schedule), tokens revealed
after the step for the masked samplers (MAR's linear schedule), 1 - t for flow matching. The interval
(t_min, t_max] limits guidance to steps whose time t lies in it; outside it no unconditional pass runs at
all (eMIGM, You et al. 2025; the guidance interval of Kynkäänniemi et al. 2024).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from isynth.config import check, finite


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0            # w at full strength; 1 = no guidance (no unconditional pass)
    schedule: Literal["constant", "linear", "pow-cosine"] = "constant" # how w grows with sampling progress
    pow: float = 1.0              # pow-cosine: w = 1 + (scale - 1) (1 - cos(pi p^pow)) / 2 (RAR)
    t_min: float = 0.0            # guide only steps whose time t is in (t_min, t_max]
    t_max: float = 1.0                      # (see t_min)

    def __post_init__(self):
        check(self.scale >= 0 and finite(self.scale),
              f"sample.guidance.scale must be a finite number >= 0, got {self.scale}")
        check(self.pow >= 0 and finite(self.pow), f"sample.guidance.pow must be a finite number >= 0, got {self.pow}")
        check(0 <= self.t_min < self.t_max <= 1,
              f"sample.guidance.t_min and sample.guidance.t_max must satisfy 0 <= t_min < t_max <= 1, "
              f"got {self.t_min} and {self.t_max}")

    @property
    def on(self) -> bool:
        return self.scale != 1.0

    @property
    def whole_range(self) -> bool:
        """True if the interval covers every step."""
        return self.t_min == 0.0 and self.t_max == 1.0

    def weight(self, progress: float, t: float | None = None) -> float | None:
        """w for a step at `progress` (and time t, where the sampler has one), or None where the step runs
        no unconditional pass: without guidance, or outside the interval."""
        if not self.on or (t is not None and not self.whole_range and not self.t_min < t <= self.t_max):
            return None  # the whole range guides every step, also one that ends at t = 0
        if self.schedule == "constant":
            return self.scale
        if self.schedule == "linear":  # MAR: 1 + (w - 1) * revealed / N
            return 1.0 + (self.scale - 1.0) * progress
        # RAR's pow-cosine; pow = 0 is constant (0 ** 0 == 1)
        return 1.0 + (self.scale - 1.0) * (1.0 - math.cos(progress ** self.pow * math.pi)) / 2.0


def guide(cond: Tensor, uncond: Tensor, weight: float) -> Tensor:
    return uncond + weight * (cond - uncond)
