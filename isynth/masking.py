"""Mask schedules, ELBO weights and reveal schedules shared by the masked paradigms (MaskGIT, eMIGM, MAR).

eMIGM (You et al. 2025, Table 1) shows MaskGIT, MAR and masked diffusion differ only by the masking
distribution, the loss weighting and the conditional distribution; these pure functions are the first
two. A schedule gamma(t) is the masked fraction at time t: gamma(0) = 0 (clean), gamma(1) = 1 (all masked;
exp reaches 1 - e^-5, and the sampler's last step reveals whatever is left).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

MaskSchedule = Literal["linear", "cosine", "exp", "poly", "log"]
_E5 = math.exp(5.0) - 1.0  # e^5 - 1, in the `log` schedule


def mask_fraction(schedule: MaskSchedule, t: Tensor) -> Tensor:
    """gamma(t): linear t, cosine cos(pi/2 (1-t)), exp 1-e^{-5t}, poly sqrt(t), log log(1+(e^5-1)t)/5."""
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * (1 - t))
    if schedule == "exp":
        return 1 - torch.exp(-5 * t)
    if schedule == "poly":
        return torch.sqrt(t)
    if schedule == "log":
        return torch.log1p(_E5 * t) / 5
    raise ValueError(f"unknown mask schedule {schedule!r}")


def inverse_mask_fraction(schedule: MaskSchedule, y: Tensor) -> Tensor:
    """t such that gamma(t) = y (every schedule is increasing on [0, 1])."""
    if schedule == "linear":
        return y
    if schedule == "cosine":
        return 1 - torch.arccos(y.clamp(0, 1)) * 2 / math.pi
    if schedule == "exp":
        return -torch.log1p(-y.clamp(max=1 - math.exp(-5))) / 5
    if schedule == "poly":
        return y * y
    if schedule == "log":
        return torch.expm1(5 * y) / _E5
    raise ValueError(f"unknown mask schedule {schedule!r}")


def elbo_weight(schedule: MaskSchedule, t: Tensor) -> Tensor:
    """The masked-diffusion ELBO weight gamma'(t) / gamma(t) (eMIGM eq. 3; Shi et al. 2024)."""
    if schedule == "linear":
        return 1 / t
    if schedule == "cosine":
        return math.pi / 2 * torch.tan(math.pi / 2 * (1 - t))
    if schedule == "exp":
        return 5 * torch.exp(-5 * t) / -torch.expm1(-5 * t)
    if schedule == "poly":
        return 0.5 / t
    if schedule == "log":
        return _E5 / ((1 + _E5 * t) * torch.log1p(_E5 * t))
    raise ValueError(f"unknown mask schedule {schedule!r}")


def masked_counts(n: int, times: list[float], schedule: MaskSchedule) -> list[int]:
    """Tokens still masked at each sampling time: floor(n * gamma(t_k)), made strictly decreasing.

    times runs from 1 (all n masked) down to the last step; the count is clamped so every step reveals at
    least one token and the last step reveals all (MAR's `max(1, min(masked - 1, ...))`, generalised so
    that no step is left with nothing to reveal). Needs len(times) - 1 <= n steps.
    """
    steps = len(times) - 1
    if not 1 <= steps <= n:
        raise ValueError(f"{steps} sampling steps for {n} tokens: need 1 <= steps <= tokens")
    gam = mask_fraction(schedule, torch.tensor(times, dtype=torch.float64))
    counts = [n]
    for k in range(1, steps + 1):
        target = math.floor(n * gam[k].item() + 1e-9)
        counts.append(0 if k == steps else max(steps - k, min(counts[-1] - 1, target)))
    return counts


def random_masks(counts: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, n) bool masks, row b with exactly counts[b] True at uniformly random positions."""
    b = counts.shape[0]
    ranks = torch.rand(b, n, generator=generator, device=counts.device).argsort(1).argsort(1)  # (B, n)
    return ranks < counts[:, None]

