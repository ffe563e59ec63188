"""Small building blocks shared by the backbone and the heads: weight initialisation and adaLN modulation."""
from __future__ import annotations

from torch import Tensor, nn


def init_weights(m: nn.Module) -> None:
    """Truncated-normal(0.02) Linear weights and zero biases (GPT-2 / ViT / DiT); use as `module.apply`."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def zero_init(*layers: nn.Linear) -> None:
    """adaLN-Zero (DiT, Peebles & Xie 2023, sec. 3.2): modulations and output layers start at zero, so every
    residual block starts as the identity and the output as 0."""
    for m in layers:
        nn.init.zeros_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: a normalised x, shifted and scaled by vectors computed from the condition."""
    return x * (1 + scale) + shift
