"""Named presets: a function per name returning a complete RunConfig for a paradigm.

`tiny` trains on CPU in seconds (tests), `cpu` is the main job's size (digits, 2 cores), and the paper
sizes (RAR-B/L/XL/XXL, seed 001 Table 1 and Table 6) are for GPU users.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from isynth.config import ModelConfig, RunConfig, TrainConfig, parse_overrides, with_overrides
from isynth.errors import IsynthError
from isynth.paradigms import paradigm_class
from isynth.paradigms.base import Paradigm


def _base(p: type[Paradigm], model: ModelConfig, train: TrainConfig, **sample) -> RunConfig:
    return RunConfig(paradigm=p.name, model=model, method=p.Config(), sample=p.SampleConfig(**sample), train=train)


def tiny(p: type[Paradigm]) -> RunConfig:
    return _base(p, ModelConfig(width=32, depth=2, num_heads=2),
                 TrainConfig(batch_size=32, lr=3e-3, max_steps=20, log_every=5, ckpt_every=10, eval_num_samples=100),
                 cfg_scale=2.0, batch_size=100)


def cpu(p: type[Paradigm]) -> RunConfig:
    """The main job's size: ~0.8M parameters, ~2 minutes of training on 2 cores (SPEC 5)."""
    return _base(p, ModelConfig(width=128, depth=4, num_heads=4),
                 TrainConfig(batch_size=128, lr=2e-3, warmup_fraction=0.05, max_steps=300, ema_decay=0.99,
                             log_every=10, ckpt_every=50, eval_num_samples=1000),
                 cfg_scale=2.0, batch_size=500)


# RAR released sizes (seed 001 Table 1) and recipe (Table 6): adaLN + qk-norm, dropout 0.1, AdamW 4e-4,
# wd 0.03, betas (0.9, 0.96), batch 2048, 100 of 400 epochs warm-up, cosine to 1e-5, grad-norm 1.0.
_RAR_SIZES = {"rar-b": (768, 24, 3072), "rar-l": (1024, 24, 4096), "rar-xl": (1280, 32, 5120), "rar-xxl": (1408, 40, 6144)}
# Released sampling (temperature, guidance g, pow) per size (SPEC 1.2).
_RAR_SAMPLING = {"rar-b": (1.0, 16.0, 2.75), "rar-l": (1.02, 15.5, 2.5), "rar-xl": (1.02, 6.9, 1.5), "rar-xxl": (1.02, 8.0, 1.2)}


def _rar_size(name: str) -> Callable[[type[Paradigm]], RunConfig]:
    width, depth, mlp = _RAR_SIZES[name]

    def preset(p: type[Paradigm]) -> RunConfig:
        model = ModelConfig(width=width, depth=depth, num_heads=16, mlp_ratio=mlp / width, dropout=0.1,
                            attn_dropout=0.1, qk_norm=True, adaln=True)
        train = TrainConfig(batch_size=2048, lr=4e-4, min_lr=1e-5, warmup_fraction=0.25, weight_decay=0.03,
                            beta1=0.9, beta2=0.96, grad_clip=1.0, ema_decay=0.9999, max_steps=250_000,
                            log_every=100, ckpt_every=2_000, eval_num_samples=50_000)
        temperature, g, pw = _RAR_SAMPLING[name]
        return _base(p, model, train, temperature=temperature, cfg_scale=g, cfg_pow=pw, batch_size=128)

    preset.__doc__ = f"{name.upper()}: {depth} x {width}, MLP {mlp}, 16 heads (seed 001 Table 1)."
    return preset


PRESETS: dict[str, Callable[[type[Paradigm]], RunConfig]] = {"tiny": tiny, "cpu": cpu}
PRESETS.update({name: _rar_size(name) for name in _RAR_SIZES})


def make_run(paradigm: str, preset: str = "cpu", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build the RunConfig for `paradigm` from a named preset and `section.field=value` overrides."""
    cls = paradigm_class(paradigm)
    if preset not in PRESETS:
        raise IsynthError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    run = PRESETS[preset](cls)
    parsed = parse_overrides(overrides)
    if "paradigm" in parsed:
        raise IsynthError("the paradigm is chosen by the command's argument, not an override")
    # Setting one budget replaces the preset's other one (a run has exactly one).
    for one, other in (("train.train_flops", "train.max_steps"), ("train.max_steps", "train.train_flops")):
        if one in parsed and other not in parsed:
            parsed[other] = "none"
    return with_overrides(run, parsed)


def with_budget(run: RunConfig, max_steps: int | None = None, train_flops: float | None = None) -> RunConfig:
    """Replace the training budget (exactly one of steps or FLOPs)."""
    return replace(run, train=replace(run.train, max_steps=max_steps, train_flops=train_flops))
