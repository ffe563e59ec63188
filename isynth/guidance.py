"""Classifier-free guidance schedules and the categorical draw, as pure functions.

A schedule maps sampling progress to a guidance weight w; `guide` mixes the conditional and
unconditional outputs as uncond + w * (cond - uncond) (Ho & Salimans 2022).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def pow_cosine_scale(step: int, num_steps: int, cfg_scale: float, cfg_pow: float) -> float:
    """RAR's schedule (seed 001 ref): w rises from 1 to g as (1 - cos(pi * (s/N)^pow)) / 2.

    pow = 0 gives the constant weight g (0 ** 0 == 1).
    """
    frac = (step / num_steps) ** cfg_pow
    return 1.0 + (cfg_scale - 1.0) * (1.0 - math.cos(frac * math.pi)) / 2.0


def guide(cond: Tensor, uncond: Tensor, weight: float) -> Tensor:
    return uncond + weight * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p (nucleus)."""
    if top_k > 0 and top_k < logits.shape[-1]:
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
