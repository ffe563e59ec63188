"""Named presets: a function per name returning a complete RunConfig for a paradigm.

`tiny` trains on CPU in seconds (tests), `cpu` is the main job's size (digits, 2 cores), and the paper
sizes (RAR-B/L/XL/XXL, seed 001; MAR-B/L/H; eMIGM XS-H, seed 004; Fluid 166M-1.1B, seed 002) are for GPU
users. A preset is a size and recipe; it applies to any paradigm, each taking the fields it has.
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any, Callable

from isynth.config import ModelConfig, RunConfig, TrainConfig, parse_overrides, with_overrides
from isynth.errors import IsynthError
from isynth.paradigms import paradigm_class
from isynth.paradigms.base import Paradigm


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that are fields of dataclass `cls` (presets set what a paradigm has)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _base(p: type[Paradigm], model: ModelConfig, train: TrainConfig, method: dict | None = None,
          **sample) -> RunConfig:
    model = replace(model, **p.model_defaults)
    return RunConfig(paradigm=p.name, model=model, method=p.Config(**_known(p.Config, method or {})),
                     sample=p.SampleConfig(**_known(p.SampleConfig, sample)), tokenizer=p.default_tokenizer,
                     train=train)


# Per-paradigm settings of the small presets: few sampling steps and a small head keep CPU sampling within
# the main job's budget (the paper settings are in the paper-size presets below).
_SMALL_METHOD = {"mar": {"num_buffer": 4}, "mdm": {"num_buffer": 4},
                 "get": {"deq_depth": 2, "deq_mlp_ratio": 4.0, "grad_steps": 3}}
# `tiny` keeps MAR's and eMIGM's MAE encoder-decoder (1 + 1 blocks), so the tests run that path.
# `cpu` gives them one 4-block bidirectional stack without MAE, as Fluid's random-continuous model has: at
# the main job's budget the 2 + 2 encoder-decoder did not learn class conditioning (MaskGIT with it: class
# accuracy 0.19-0.20 against 0.99 with one stack; BENCHMARKS.md). The paper presets keep MAE.
_TINY_SPLIT_DEPTH = {"mar", "mdm"}
_CPU_METHOD = {"mar": {"mae": False, "decoder_depth": 0}, "mdm": {"mae": False, "decoder_depth": 0}}
# Continuous tokens in the main job are 2x2 patches (16 tokens of 4 values): with 8x8 scalar tokens none of
# the continuous paradigms learned digits at the main job's budget (class accuracy 0.07-0.16), with 2x2
# patches they do (BENCHMARKS.md).
_CPU_PATCH = 2
_SMALL_HEAD = {"head_width": 128, "head_depth": 2}
_TINY_SAMPLING = {"maskgit": {"num_steps": 4}, "mdm": {"num_steps": 4, "head_steps": 4},
                  "mar": {"num_steps": 4, "head_sampler": "dpm++", "head_steps": 4},
                  "ar-cont": {"head_sampler": "dpm++", "head_steps": 4}, "diffusion": {"num_steps": 3},
                  "get": {"fixed_point_iters": 3}}
_CPU_SAMPLING = {"maskgit": {"num_steps": 8}, "mdm": {"num_steps": 8, "head_steps": 10},
                 "mar": {"num_steps": 8, "head_sampler": "dpm++", "head_steps": 10},
                 "ar-cont": {"head_sampler": "dpm++", "head_steps": 10}, "diffusion": {"num_steps": 8}}


def tiny(p: type[Paradigm]) -> RunConfig:
    depth = 1 if p.name in _TINY_SPLIT_DEPTH else 2  # encoder and decoder of 1 block each
    return _base(p, ModelConfig(width=32, depth=depth, num_heads=2),
                 TrainConfig(batch_size=32, lr=3e-3, max_steps=20, log_every=5, ckpt_every=10, eval_num_samples=100),
                 method={**_SMALL_METHOD.get(p.name, {}), "head_width": 32, "head_depth": 2},
                 **{"cfg_scale": 2.0, "batch_size": 100, **_TINY_SAMPLING.get(p.name, {})})


def cpu(p: type[Paradigm]) -> RunConfig:
    """The main job's size: 4 blocks of width 128 (~0.8M parameters in the backbone), batch 64."""
    run = _base(p, ModelConfig(width=128, depth=4, num_heads=4),
                TrainConfig(batch_size=64, lr=2e-3, warmup_fraction=0.05, max_steps=300, ema_decay=0.99,
                            log_every=10, ckpt_every=50, eval_num_samples=1000),
                method={**_SMALL_METHOD.get(p.name, {}), **_CPU_METHOD.get(p.name, {}), **_SMALL_HEAD},
                **{"cfg_scale": 2.0, "batch_size": 500, **_CPU_SAMPLING.get(p.name, {})})
    if run.tokenizer.kind == "patch":
        run = replace(run, tokenizer=replace(run.tokenizer, patch_size=_CPU_PATCH))
    return run


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


# MAR (Li et al. 2024, Table / reference scripts): encoder and decoder of `depth` blocks each, 16 heads,
# head (depth, width), 64 buffer tokens, dropout 0.1, class drop 0.1; AdamW lr 1e-4 x batch/256 = 8e-4,
# betas (0.9, 0.95), wd 0.02, 100 of 400 epochs warm-up then constant (min_lr = lr), grad clip 3.0,
# EMA 0.9999; sampling 64 steps, linear CFG (B 2.9, L 3.0, H 3.2), DDPM 100 head steps.
_MAR_SIZES = {"mar-b": (768, 12, (6, 1024), 2.9), "mar-l": (1024, 16, (8, 1280), 3.0),
              "mar-h": (1280, 20, (12, 1536), 3.2)}
# eMIGM (seed 004 Table 6): XS 448x10, S 512x12, B 768x12, L 1024x16, H 1280x20 with MAR's recipe; B/L/H
# reuse MAR's heads (same parameter counts, 208M/478M/942M). The XS/S head sizes are not in the seed: a
# 3 x 1024 head gives ~69M / ~97M in all, the paper's totals. Sampling: 16 steps, 8 DPM-Solver++ steps,
# constant CFG 4 on the released intervals (seed 004, reference scripts).
_EMIGM_SIZES = {"emigm-xs": (448, 10, (3, 1024), (0.1, 0.3)), "emigm-s": (512, 12, (3, 1024), (0.1, 0.3)),
                "emigm-b": (768, 12, (6, 1024), (0.1, 0.3)), "emigm-l": (1024, 16, (8, 1280), (0.1, 0.3)),
                "emigm-h": (1280, 20, (12, 1536), (0.2, 0.4))}
# Fluid (seed 002) names its models by parameter count only; these depth x width shapes give our backbone
# those totals (12 * depth * width^2 per transformer) with one bidirectional or causal stack (no MAE split),
# a 3 x 1024 diffusion head, and Fluid's tuned random-continuous sampling (w 5, temperature 0.975).
_FLUID_SIZES = {"fluid-166m": (1024, 12), "fluid-369m": (1280, 18), "fluid-665m": (1536, 24), "fluid-1.1b": (1792, 28)}


def _mar_recipe(width: int, depth: int, mlp_head: tuple[int, int], method: dict, **sample) -> Callable:
    def preset(p: type[Paradigm]) -> RunConfig:
        model = ModelConfig(width=width, depth=depth, num_heads=16, dropout=0.1, attn_dropout=0.1)
        train = TrainConfig(batch_size=2048, lr=8e-4, min_lr=8e-4, warmup_fraction=0.25, weight_decay=0.02,
                            beta1=0.9, beta2=0.95, grad_clip=3.0, ema_decay=0.9999, max_steps=250_000,
                            log_every=100, ckpt_every=2_000, eval_num_samples=50_000)
        head = {"head_depth": mlp_head[0], "head_width": mlp_head[1], "diffusion_batch_mul": 4}
        return _base(p, model, train, method={"num_buffer": 64, **head, **method},
                     **{"batch_size": 256, **sample})
    return preset


def _mar_size(name: str) -> Callable:
    width, depth, head, w = _MAR_SIZES[name]
    preset = _mar_recipe(width, depth, head, {"mae": True, "decoder_depth": depth}, num_steps=64, cfg_scale=w,
                         cfg_schedule="linear", head_sampler="ddpm", head_steps=100)
    preset.__doc__ = f"{name.upper()}: encoder and decoder {depth} x {width}, head {head[0]} x {head[1]} (MAR)."
    return preset


def _emigm_size(name: str) -> Callable:
    width, depth, head, (lo, hi) = _EMIGM_SIZES[name]
    preset = _mar_recipe(width, depth, head, {"mae": True, "decoder_depth": depth, "mask_schedule": "exp",
                                              "t_min": 0.2, "null_is_mask_token": True},
                         num_steps=16, cfg_scale=4.0, cfg_schedule="constant", cfg_t_min=lo, cfg_t_max=hi,
                         head_sampler="dpm++", head_steps=8, head_order=3)
    preset.__doc__ = f"{name} (seed 004): encoder and decoder {depth} x {width}, head {head[0]} x {head[1]}."
    return preset


def _fluid_size(name: str) -> Callable:
    width, depth = _FLUID_SIZES[name]
    preset = _mar_recipe(width, depth, (3, 1024), {"mae": False, "decoder_depth": 0, "num_buffer": 1},
                         num_steps=64, cfg_scale=5.0, temperature=0.975, cfg_schedule="linear",
                         head_sampler="ddpm", head_steps=100)
    preset.__doc__ = f"{name} (seed 002): {depth} x {width}, one stack, head 3 x 1024."
    return preset


# GET (seed 000, reference STAT.md): D, heads, injection depth, equilibrium MLP ratio; 3 equilibrium blocks,
# patch 2 on 32x32 images (CIFAR-10), unconditional; AdamW lr 1e-4, wd 0, constant lr, batch 128, EMA
# 0.9999, 800k iterations; training solver 0 + 6 unrolled steps, sampling 6 iterations (run.sh).
_GET_SIZES = {"get-t": (256, 4, 6, 6.0, "8.6M"), "get-m": (384, 6, 6, 6.0, "19.2M"), "get-s": (512, 8, 6, 8.0, "37.2M"),
              "get-b": (768, 12, 1, 12.0, "62.2M"), "get-b+": (768, 12, 6, 8.0, "83.5M")}


def _get_size(name: str) -> Callable:
    width, heads, depth, ratio, params = _GET_SIZES[name]

    def preset(p: type[Paradigm]) -> RunConfig:
        model = ModelConfig(width=width, depth=depth, num_heads=heads)
        train = TrainConfig(batch_size=128, lr=1e-4, min_lr=1e-4, warmup_fraction=0.0, weight_decay=0.0,
                            beta1=0.9, beta2=0.999, ema_decay=0.9999, max_steps=800_000, log_every=100,
                            ckpt_every=5_000, eval_num_samples=50_000)
        run = _base(p, model, train, method={"deq_depth": 3, "deq_mlp_ratio": ratio, "class_cond": False,
                                             "train_solver_iters": 0, "grad_steps": 6},
                    fixed_point_iters=6, batch_size=256)
        return replace(run, tokenizer=replace(run.tokenizer, kind="patch", patch_size=2))

    preset.__doc__ = f"{name.upper()}/2 (seed 000): {depth} injection blocks of {width}, 3 equilibrium blocks, " \
                     f"MLP ratio {ratio:g}; {params} parameters in the paper."
    return preset


PRESETS: dict[str, Callable[[type[Paradigm]], RunConfig]] = {"tiny": tiny, "cpu": cpu}
PRESETS.update({name: _rar_size(name) for name in _RAR_SIZES})
PRESETS.update({name: _mar_size(name) for name in _MAR_SIZES})
PRESETS.update({name: _emigm_size(name) for name in _EMIGM_SIZES})
PRESETS.update({name: _fluid_size(name) for name in _FLUID_SIZES})
PRESETS.update({name: _get_size(name) for name in _GET_SIZES})


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
