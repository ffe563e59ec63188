"""The settings of `isynth tokenizer train`: frozen, typed sections (`model`, `loss`, `data`, `train`), the
`tiny` and `cpu` presets, and building a config from a kind, a preset and `section.field=value` overrides.

`data` and `train` are the generator's own sections (`isynth.config`); `train.eval_num_samples` is unused here:
the metrics use the whole held-out split.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from isynth.config import LEARNED_KINDS, DataConfig, TrainConfig, check
from isynth.errors import IsynthError
from isynth.overrides import apply, parse_overrides
from isynth.tokenizers.nets import NetConfig


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training objective (`isynth.tokenizers.train`); each applies where its kind has it."""

    recon: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss (VQGAN: L1)
    perceptual: float = 0.1   # MSE between the feature net's features of reconstruction and input; 0: off
    kl: float = 1e-6          # kl: KL summed over the latent, per pixel value of the image (LDM's KL-f4 weight)
    commit: float = 0.25      # vq, lfq: commitment weight beta (VQ-VAE)
    entropy: float = 0.1      # lfq: entropy penalty weight (MAGVIT-v2)

    def __post_init__(self):
        for name in ("perceptual", "kl", "commit", "entropy"):
            value = getattr(self, name)
            check(0 <= value < math.inf, f"loss.{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    kind: Literal["vq", "fsq", "lfq", "kl"]
    model: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="shapes"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000))

    def __post_init__(self):
        k = self.model.codebook_size
        check(self.kind != "lfq" or k & (k - 1) == 0,
              f"model.codebook_size={k}: lfq needs a power of 2 (one bit per latent channel)")
        check(self.kind != "lfq" or k <= 2 ** 16, f"model.codebook_size={k}: lfq's entropy term scores every code; "
              "use at most 2^16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _tiny(kind: str) -> dict:
    """Seconds on CPU (the tests): width 8, small codebooks, 60 steps of 16 images."""
    return {"model.width": 8, "model.mult": "1,2", "model.norm_groups": 4, "model.codebook_size": 64,
            "model.codebook_dim": 4, "model.levels": "5,3,3", "loss.entropy": 0.02, "train.batch_size": 16,
            "train.lr": 5e-3, "train.beta2": 0.99, "train.weight_decay": 0.0, "train.warmup_fraction": 0.1,
            "train.max_steps": 60, "train.ema_decay": 0.99, "train.log_every": 5, "train.ckpt_every": 20}


def _cpu(kind: str) -> dict:
    """A few minutes on 2 CPU cores at 32x32 shapes: widths 32-64, 8x8 tokens, 1200 steps of 16 images.

    Chosen by a sweep of this budget's settings (run on a GPU, one seed): perceptual weight 0.5 rather than 0.1
    halved rFD; batch 16 x 1200 steps beat batch 32 x 600 steps (the same images) by 2-7x in rFD; lr 1e-3 beat
    2e-3; lfq needs its entropy term (without it 12% of the codes were used), but 0.1 cost reconstruction and
    0.02 did not."""
    codes = {"vq": 512, "lfq": 1024}.get(kind, 1024)
    return {"model.width": 32, "model.mult": "1,2", "model.norm_groups": 8, "model.codebook_size": codes,
            "model.codebook_dim": 8, "model.levels": "8,5,5,5", "loss.perceptual": 0.5, "loss.entropy": 0.02,
            "train.batch_size": 16, "train.lr": 1e-3, "train.beta2": 0.99, "train.weight_decay": 0.0,
            "train.warmup_fraction": 0.05, "train.max_steps": 1200, "train.ema_decay": 0.999, "train.log_every": 20,
            "train.ckpt_every": 200}


PRESETS = {"tiny": _tiny, "cpu": _cpu}


def make_config(kind: str, preset: str, overrides: list[str] | tuple[str, ...] = ()) -> TokenizerTrainConfig:
    """The config of `isynth tokenizer train KIND --preset PRESET section.field=value ...`, all checked."""
    if kind not in LEARNED_KINDS:
        raise IsynthError(f"unknown tokenizer kind {kind!r}: train one of {', '.join(LEARNED_KINDS)} (a pretrained "
                          "diffusers VAE needs no training: tokenizer.kind=vae tokenizer.path=DIR)")
    if preset not in PRESETS:
        raise IsynthError(f"unknown tokenizer preset {preset!r}: choose {' or '.join(PRESETS)}")
    values = parse_overrides(list(overrides))
    for key in values:
        if "." not in key:
            raise IsynthError(f"invalid override {key!r}: set a section's field, e.g. model.width=64 (sections: "
                              "model, loss, data, train; the kind is the command's argument)")
    return apply(apply(TokenizerTrainConfig(kind), PRESETS[preset](kind)), values)
