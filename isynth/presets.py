"""Named presets. A preset is a size and a recipe: given the paradigm and its token family it returns the
`section.field` settings to apply to the paradigm's default run, before the user's overrides.

`tiny` trains on CPU in seconds (tests), `cpu` is the main job's size (digits, 2 cores), and the paper
sizes are for GPU users: RAR-B/L/XL/XXL (Yu et al. 2024), MAR-B/L/H (Li et al. 2024), eMIGM XS-H (You et
al. 2025), Fluid 166M-1.1B (Fan et al. 2024), GET-T..B+ (Geng et al. 2023). A paper preset's model and
training recipe apply to every paradigm; its sampling settings to the paper's own paradigms. A setting for
a field the run does not have is an error (tested for every preset and paradigm).
"""
from __future__ import annotations

from collections.abc import Callable

from isynth.config import RunConfig
from isynth.errors import IsynthError
from isynth.overrides import apply, parse_overrides
from isynth.paradigms import default_run, paradigm_class
from isynth.paradigms.base import Paradigm
from isynth.tokenizers.store import read_manifest

Settings = dict[str, object]
Preset = Callable[[type[Paradigm], bool], Settings]  # (paradigm, discrete tokens) -> settings


def _section(name: str, **values: object) -> Settings:
    return {f"{name}.{k}": v for k, v in values.items()}


def _uses_head(p: type[Paradigm], discrete: bool) -> bool:
    """Whether the run has MAR's diffusion head (`method.head`, `sample.head.steps`)."""
    return p.per_token_head and not discrete


_MASKED = ("maskgit", "mdm", "mar")

# --- laptop presets ----------------------------------------------------------------------------------
# Few sampling steps and a small head keep CPU sampling within the main job's budget (the paper settings
# are in the paper-size presets below).
# The main job's training budget per paradigm (`isynth compare`), also the `cpu` preset's: ~280 steps of
# `ar` at batch 64, ~45-55 s per paradigm on 2 cores, so all eight paradigms, their evaluations and GET's
# pairs fit in 10 minutes (BENCHMARKS.md). A run trained with the preset's budget gets the main job's quality.
MAIN_JOB_TRAIN_FLOPS = 6e12

_SMALL_METHOD = {"mar": {"method.num_buffer": 4}, "mdm": {"method.num_buffer": 4},
                 "get": {"method.deq_depth": 2, "method.deq_mlp_ratio": 4.0, "method.grad_steps": 3}}
# `cpu` gives mar and mdm one 4-block bidirectional stack without MAE, as Fluid's random-continuous model
# has: the 2 + 2 encoder-decoder did not learn at the main job's budget (BENCHMARKS.md). `tiny` keeps the
# MAE encoder-decoder (1 + 1 blocks), so the tests run that path.
_CPU_METHOD = {"mar": {"method.mae": False, "method.decoder_depth": 0},
               "mdm": {"method.mae": False, "method.decoder_depth": 0}}
_TINY_SAMPLING = {"maskgit": {"sample.num_steps": 4}, "mdm": {"sample.num_steps": 4}, "mar": {"sample.num_steps": 4},
                  "diffusion": {"sample.num_steps": 3}, "get": {"sample.fixed_point_iters": 3}}
_CPU_SAMPLING = {"maskgit": {"sample.num_steps": 8}, "mdm": {"sample.num_steps": 8}, "mar": {"sample.num_steps": 8},
                 "diffusion": {"sample.num_steps": 8}}


def tiny(p: type[Paradigm], discrete: bool) -> Settings:
    """Seconds on CPU (the tests): 2 blocks of width 32 (1 + 1 for mar and mdm), 20 steps."""
    s = {**_section("model", width=32, depth=1 if p.name in ("mar", "mdm") else 2, num_heads=2),
         **_section("train", batch_size=32, lr=3e-3, max_steps=20, log_every=5, ckpt_every=10, eval_num_samples=100),
         "sample.batch_size": 100, **_SMALL_METHOD.get(p.name, {}), **_TINY_SAMPLING.get(p.name, {})}
    if p.guided:
        s["sample.guidance.scale"] = 2.0
    if _uses_head(p, discrete):
        s |= {"method.head.width": 32, "method.head.depth": 2, "sample.head.sampler": "dpm++", "sample.head.steps": 4}
    return s


def cpu(p: type[Paradigm], discrete: bool) -> Settings:
    """The main job's size and budget: 4 blocks of width 128 (~0.8M parameters in the backbone), batch 64,
    6e12 training FLOPs."""
    s = {**_section("model", width=128, depth=4, num_heads=4),
         **_section("train", batch_size=64, lr=2e-3, warmup_fraction=0.05, max_steps=None,
                    train_flops=MAIN_JOB_TRAIN_FLOPS, ema_decay=0.99,
                    log_every=10, ckpt_every=50, eval_num_samples=1000),
         "sample.batch_size": 500, **_SMALL_METHOD.get(p.name, {}), **_CPU_METHOD.get(p.name, {}),
         **_CPU_SAMPLING.get(p.name, {})}
    if p.guided:
        s["sample.guidance.scale"] = 2.0
    if not discrete:  # 2x2 patches: with 8x8 scalar tokens no continuous paradigm learned digits (BENCHMARKS.md)
        s["tokenizer.patch_size"] = 2
    if _uses_head(p, discrete):
        s |= {"method.head.width": 128, "method.head.depth": 2, "sample.head.sampler": "dpm++", "sample.head.steps": 10}
    return s


# Smaller sizes of the `cpu` recipe, for sweeps over model size at laptop budgets (isynth sweep --preset
# tradeoffs): width, depth, heads; the diffusion head takes the backbone's width.
_CPU_SIZES = {"cpu-xs": (32, 2, 2), "cpu-s": (64, 3, 2)}


def _cpu_size(name: str) -> Preset:
    width, depth, heads = _CPU_SIZES[name]

    def preset(p: type[Paradigm], discrete: bool) -> Settings:
        s = cpu(p, discrete) | _section("model", width=width, depth=depth, num_heads=heads)
        if _uses_head(p, discrete):
            s["method.head.width"] = width
        return s

    preset.__doc__ = f"The cpu recipe at {depth} blocks of width {width} (sweeps over size)."
    return preset


# --- paper sizes ---------------------------------------------------------------------------------------

# RAR (Yu et al. 2024) Table 1 sizes; Table 6 recipe: adaLN + qk-norm, dropout 0.1, AdamW 4e-4, wd 0.03,
# betas (0.9, 0.96), batch 2048, 100 of 400 epochs warm-up, cosine to 1e-5, grad-norm 1.0, no EMA (the
# 1d-tokenizer config leaves its EMA off; decay 0 makes the EMA weights the trained ones). `rar` gets the
# released model's layout (modeling/rar.py): a cls token, adaLN on class + per-position embedding, and the
# LayerNorms' own affine parameters kept under adaLN. Released sampling (temperature, guidance scale,
# pow-cosine exponent) per size, from the 1d-tokenizer repository.
_RAR_SIZES = {"rar-b": (768, 24, 3072, (1.0, 16.0, 2.75)), "rar-l": (1024, 24, 4096, (1.02, 15.5, 2.5)),
              "rar-xl": (1280, 32, 5120, (1.02, 6.9, 1.5)), "rar-xxl": (1408, 40, 6144, (1.02, 8.0, 1.2))}


def _rar_size(name: str) -> Preset:
    width, depth, mlp, (temperature, scale, pw) = _RAR_SIZES[name]

    def preset(p: type[Paradigm], discrete: bool) -> Settings:
        s = {**_section("model", width=width, depth=depth, num_heads=16, mlp_ratio=mlp / width, dropout=0.1,
                        attn_dropout=0.1, qk_norm=True, adaln=True, adaln_norm_affine=True),
             **_section("train", batch_size=2048, lr=4e-4, min_lr=1e-5, warmup_fraction=0.25, weight_decay=0.03,
                        beta1=0.9, beta2=0.96, grad_clip=1.0, ema_decay=0.0, max_steps=250_000, log_every=100,
                        ckpt_every=2_000, eval_num_samples=50_000),
             "sample.batch_size": 128}
        if p.name == "rar":
            s |= _section("method", cls_token=True, position_condition=True)
        if p.name in ("ar", "rar") and discrete:
            s |= {"sample.head.temperature": temperature,
                  **_section("sample.guidance", scale=scale, schedule="pow-cosine", pow=pw)}
        return s

    preset.__doc__ = f"{name.upper()}: {depth} x {width}, MLP {mlp}, 16 heads (RAR Table 1)."
    return preset


# MAR (Li et al. 2024, reference scripts): encoder and decoder of `depth` blocks each, 16 heads, head
# (depth, width), 64 buffer tokens, dropout 0.1, class drop 0.1; AdamW lr 1e-4 x batch/256 = 8e-4, betas
# (0.9, 0.95), wd 0.02, 100 of 400 epochs warm-up then constant (min_lr = lr), grad clip 3.0, EMA 0.9999.
def _mar_recipe(width: int, depth: int, head: tuple[int, int], p: type[Paradigm], discrete: bool,
                masked: Settings) -> Settings:
    s = {**_section("model", width=width, depth=depth, num_heads=16, dropout=0.1, attn_dropout=0.1),
         **_section("train", batch_size=2048, lr=8e-4, min_lr=8e-4, warmup_fraction=0.25, weight_decay=0.02,
                    beta1=0.9, beta2=0.95, grad_clip=3.0, ema_decay=0.9999, max_steps=250_000, log_every=100,
                    ckpt_every=2_000, eval_num_samples=50_000),
         "sample.batch_size": 256}
    if p.name in _MASKED:
        s |= masked
    if _uses_head(p, discrete):
        s |= _section("method.head", depth=head[0], width=head[1], diffusion_batch_mul=4)
    return s


# MAR sampling: 64 steps, linear CFG (B 2.9, L 3.0, H 3.2), 100 DDPM head steps.
_MAR_SIZES = {"mar-b": (768, 12, (6, 1024), 2.9), "mar-l": (1024, 16, (8, 1280), 3.0),
              "mar-h": (1280, 20, (12, 1536), 3.2)}


def _mar_size(name: str) -> Preset:
    width, depth, head, scale = _MAR_SIZES[name]

    def preset(p: type[Paradigm], discrete: bool) -> Settings:
        masked = _section("method", num_buffer=64, mae=True, decoder_depth=depth)
        s = _mar_recipe(width, depth, head, p, discrete, masked)
        if p.name == "mar":
            s |= {"sample.num_steps": 64, **_section("sample.guidance", scale=scale, schedule="linear")}
            if not discrete:
                s |= _section("sample.head", sampler="ddpm", steps=100)
        return s

    preset.__doc__ = f"{name.upper()}: encoder and decoder {depth} x {width}, head {head[0]} x {head[1]} (MAR)."
    return preset


# eMIGM (You et al. 2025, Table 6): XS 448x10, S 512x12, B 768x12, L 1024x16, H 1280x20 with MAR's recipe;
# B/L/H reuse MAR's heads (same parameter counts, 208M/478M/942M). The XS/S head sizes are not given: a
# 3 x 1024 head gives ~69M / ~97M in all, the paper's totals. Sampling: 16 steps, 8 DPM-Solver++ steps,
# constant CFG 4 on the released intervals (the ML-GSAI/eMIGM scripts).
_EMIGM_SIZES = {"emigm-xs": (448, 10, (3, 1024), (0.1, 0.3)), "emigm-s": (512, 12, (3, 1024), (0.1, 0.3)),
                "emigm-b": (768, 12, (6, 1024), (0.1, 0.3)), "emigm-l": (1024, 16, (8, 1280), (0.1, 0.3)),
                "emigm-h": (1280, 20, (12, 1536), (0.2, 0.4))}


def _emigm_size(name: str) -> Preset:
    width, depth, head, (lo, hi) = _EMIGM_SIZES[name]

    def preset(p: type[Paradigm], discrete: bool) -> Settings:
        masked = _section("method", num_buffer=64, mae=True, decoder_depth=depth)
        s = _mar_recipe(width, depth, head, p, discrete, masked)
        if p.name == "mdm":
            s |= {**_section("method", mask_schedule="exp", t_min=0.2, null_is_mask_token=True), "sample.num_steps": 16,
                  **_section("sample.guidance", scale=4.0, schedule="constant", t_min=lo, t_max=hi)}
            if not discrete:
                s |= _section("sample.head", sampler="dpm++", steps=8, order=3)
        return s

    preset.__doc__ = f"{name} (eMIGM): encoder and decoder {depth} x {width}, head {head[0]} x {head[1]}."
    return preset


# Fluid (Fan et al. 2024) names its models by parameter count only; these depth x width shapes give our
# backbone those totals (12 depth width^2 per transformer) with one bidirectional or causal stack (no MAE
# split) and a 3 x 1024 head. Each cell of Fluid's grid samples with its tuned (guidance, temperature):
# random-continuous 5 / 0.975, raster-continuous 4.5 / 0.975, random-discrete 1.6 / 1.05, raster-discrete
# 2.5 / 0.95; the random-order cells with 64 steps and MAR's linear schedule.
_FLUID_SIZES = {"fluid-166m": (1024, 12), "fluid-369m": (1280, 18), "fluid-665m": (1536, 24), "fluid-1.1b": (1792, 28)}
_FLUID_SAMPLING = {("mar", False): (5.0, 0.975), ("mdm", False): (5.0, 0.975), ("ar-cont", False): (4.5, 0.975),
                   ("mar", True): (1.6, 1.05), ("mdm", True): (1.6, 1.05), ("maskgit", True): (1.6, 1.05),
                   ("ar", True): (2.5, 0.95)}  # (paradigm, discrete tokens) -> (guidance, temperature)


def _fluid_size(name: str) -> Preset:
    width, depth = _FLUID_SIZES[name]

    def preset(p: type[Paradigm], discrete: bool) -> Settings:
        s = _mar_recipe(width, depth, (3, 1024), p, discrete,
                        _section("method", num_buffer=1, mae=False, decoder_depth=0))
        if (p.name, discrete) in _FLUID_SAMPLING:
            scale, temperature = _FLUID_SAMPLING[p.name, discrete]
            s |= {"sample.guidance.scale": scale, "sample.head.temperature": temperature}
            if p.name in _MASKED:
                s |= {"sample.num_steps": 64, "sample.guidance.schedule": "linear"}
            if _uses_head(p, discrete):
                s |= _section("sample.head", sampler="ddpm", steps=100)
        return s

    preset.__doc__ = f"{name} (Fluid): {depth} x {width}, one stack, head 3 x 1024."
    return preset


# GET (Geng et al. 2023; locuslab/get STAT.md): D, heads, injection depth, equilibrium MLP ratio; 3
# equilibrium blocks, patch 2 on 32x32 images (CIFAR-10), unconditional; AdamW lr 1e-4, wd 0, constant lr,
# batch 128, EMA 0.9999, 800k iterations; training solver 0 + 6 unrolled steps, sampling 6 iterations (run.sh).
_GET_SIZES = {"get-t": (256, 4, 6, 6.0, "8.6M"), "get-m": (384, 6, 6, 6.0, "19.2M"),
              "get-s": (512, 8, 6, 8.0, "37.2M"), "get-b": (768, 12, 1, 12.0, "62.2M"),
              "get-b+": (768, 12, 6, 8.0, "83.5M")}


def _get_size(name: str) -> Preset:
    width, heads, depth, ratio, params = _GET_SIZES[name]

    def preset(p: type[Paradigm], discrete: bool) -> Settings:
        s = {**_section("model", width=width, depth=depth, num_heads=heads),
             **_section("train", batch_size=128, lr=1e-4, min_lr=1e-4, warmup_fraction=0.0, weight_decay=0.0,
                        beta1=0.9, beta2=0.999, ema_decay=0.9999, max_steps=800_000, log_every=100,
                        ckpt_every=5_000, eval_num_samples=50_000),
             "sample.batch_size": 256}
        if not discrete:
            s["tokenizer.patch_size"] = 2
        if p.name == "get":
            s |= {**_section("method", deq_depth=3, deq_mlp_ratio=ratio, class_cond=False, train_solver_iters=0,
                             grad_steps=6), "sample.fixed_point_iters": 6}
        return s

    preset.__doc__ = (f"{name.upper()}/2 (GET): {depth} injection blocks of {width}, 3 equilibrium blocks, "
                      f"MLP ratio {ratio:g}; {params} parameters in the paper.")
    return preset


PRESETS: dict[str, Preset] = {"tiny": tiny, "cpu": cpu}
PRESETS.update({name: _cpu_size(name) for name in _CPU_SIZES})
PRESETS.update({name: _rar_size(name) for name in _RAR_SIZES})
PRESETS.update({name: _mar_size(name) for name in _MAR_SIZES})
PRESETS.update({name: _emigm_size(name) for name in _EMIGM_SIZES})
PRESETS.update({name: _fluid_size(name) for name in _FLUID_SIZES})
PRESETS.update({name: _get_size(name) for name in _GET_SIZES})


def make_run(paradigm: str, preset: str = "cpu", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The RunConfig of `paradigm` at a named preset, with `section.field=value` overrides applied.

    The token family comes first (the paradigm's tokenizer, or `tokenizer.kind=...`), because it decides
    which head sections the run has; then the preset's settings, then every override."""
    cls = paradigm_class(paradigm)
    if preset not in PRESETS:
        raise IsynthError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    parsed = parse_overrides(overrides)
    if "paradigm" in parsed:
        raise IsynthError("the paradigm is chosen by the command's argument, not an override")
    family = {k.removeprefix("tokenizer."): v for k, v in parsed.items() if k in ("tokenizer.kind", "tokenizer.path")}
    if "path" in family and "kind" not in family:  # a learned tokenizer's directory says what it is
        family["kind"] = parsed["tokenizer.kind"] = read_manifest(family["path"])["kind"]
    run = default_run(paradigm, apply(cls.default_tokenizer, family, "tokenizer."))
    run = apply(run, PRESETS[preset](cls, run.tokenizer.discrete))
    # Setting one budget replaces the preset's other one (a run has exactly one).
    for one, other in (("train.train_flops", "train.max_steps"), ("train.max_steps", "train.train_flops")):
        if one in parsed and other not in parsed:
            parsed[other] = "none"
    return apply(run, parsed)
