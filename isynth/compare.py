"""`isynth compare`, the main job: every paradigm trained at the same training-FLOPs budget on digits,
evaluated with the same metrics, tabulated with the compute each one spent (Kilian et al. 2024's
protocol at laptop scale). Re-running resumes finished and unfinished runs alike.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import torch

from isynth.errors import IsynthError
from isynth.eval.run_eval import evaluate_run
from isynth.files import atomic_write_text
from isynth.overrides import apply
from isynth.pairs import generate_pairs
from isynth.paradigms import PARADIGMS
from isynth.presets import make_run
from isynth.tokenizers.train import train_tokenizer
from isynth.tokenizers.trainconfig import make_config
from isynth.trainer import build, train

# Training FLOPs per paradigm in the default main job: ~280 steps of `ar` at batch 64, ~45-55 s per paradigm
# on 2 cores, so all eight paradigms, their evaluations and GET's pairs fit in 10 minutes (BENCHMARKS.md).
DEFAULT_TRAIN_FLOPS = 6e12

COLUMNS = [  # (header, key, format)
    ("paradigm", "paradigm", "{}"),
    ("params", "params", "{:,}"),
    ("train FLOPs", "train_flops", "{:.2e}"),
    ("steps", "step", "{}"),
    ("class acc", "class_accuracy", "{:.3f}"),
    ("held-out acc", "heldout_class_accuracy", "{:.3f}"),
    ("FD-{data}", "fd", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("IS", "inception_score", "{:.2f}"),
    ("memorised", "memorization_rate", "{:.3f}"),
    ("NLL bits/tok", "nll_bits_per_token", "{:.3f}"),
    ("sample FLOPs/img", "sample_flops_per_image", "{:.2e}"),
    ("NFE", "nfe", "{}"),
    ("teacher FLOPs", "teacher_train_flops", "{:.2e}"),
    ("pair FLOPs", "pair_flops", "{:.2e}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("train s", "train_wall_s", "{:.0f}"),
    ("sampling", "sampling_short", "{}"),
]


# The tokenizers of a main job on other data than digits, by token family (discrete?), and their token grid:
# 8x8 FSQ codes, or 8x8x4 KL latents in 2x2 cells (16 tokens of 16 values, like digits' 2x2 patches).
LEARNED = {True: "fsq", False: "kl"}
LEARNED_TOKENS = {"fsq": [], "kl": ["tokenizer.patch_size=2"]}
# The teacher of `get` in the main job: its pairs come from the `diffusion` run trained just before.
PAIRS_DIR, TEACHER = "get-pairs", "diffusion"
DEFAULT_NUM_PAIRS = 2048


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def short_sampling(s: dict) -> str:
    """The sampling settings that matter for a row, as `field=value` by dotted name: settings that do nothing
    (no filtering, the whole guidance interval, guidance details without guidance) are left out."""
    flat = _flat(s)
    inert = {"batch_size": flat.get("batch_size"), "head.top_k": 0, "head.top_p": 1.0,
             "guidance.t_min": 0.0, "guidance.t_max": 1.0}
    if flat.get("guidance.schedule") != "pow-cosine":
        inert["guidance.pow"] = flat.get("guidance.pow")
    if flat.get("guidance.scale") == 1.0:
        inert |= {k: v for k, v in flat.items() if k.startswith("guidance.") and k != "guidance.scale"}
    if flat.get("head.sampler") != "dpm++":
        inert["head.order"] = flat.get("head.order")
    return " ".join(f"{k}={v}" for k, v in flat.items() if k not in inert or inert[k] != v)


def table(rows: list[dict], data: str = "digits") -> str:
    lines = ["| " + " | ".join(h.format(data=data) for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_compare(out: Path, names: list[str] | None, preset: str, train_flops: float | None,
                overrides: list[str], progress: bool = True, num_pairs: int = DEFAULT_NUM_PAIRS,
                data: list[str] = ()) -> list[dict]:
    """Train and evaluate `names` (default: every paradigm) at one budget. `data` are `data.` settings of
    another dataset than digits: then a discrete and a continuous tokenizer are trained first (FSQ and KL, at
    the tokenizer preset `cpu`, or `tiny` with the tiny preset) and each paradigm takes the one of its token
    family."""
    names = names or list(PARADIGMS)
    unknown = [n for n in names if n not in PARADIGMS]
    if unknown:
        raise IsynthError(f"unknown paradigm {unknown[0]!r}; choose from {', '.join(PARADIGMS)}")
    if "get" in names and TEACHER not in names:
        raise IsynthError(f"get distils the {TEACHER} run's sampler: include {TEACHER} in --paradigms")
    if num_pairs < 1:
        raise IsynthError(f"--num-pairs must be >= 1, got {num_pairs}")
    names = sorted(names, key=list(PARADIGMS).index)  # the teacher trains before its student
    budget = DEFAULT_TRAIN_FLOPS if train_flops is None else train_flops
    if not (budget > 0 and math.isfinite(budget)):
        raise IsynthError(f"--flops must be a finite number > 0, got {budget}")
    budget_args = [f"train.train_flops={budget}", "train.max_steps=none"]
    out = Path(out)
    pairs_dir = out.resolve() / PAIRS_DIR
    learned = {n: LEARNED[PARADIGMS[n].default_tokenizer.discrete] for n in names} if data else {}
    tok_dirs = {kind: out.resolve() / f"tokenizer-{kind}" for kind in set(learned.values())}
    # shapes: two samples of each of its 540 classes (unless the overrides say otherwise)
    per_class = ["train.eval_num_samples=1080"] if "data.name=shapes" in data else []
    runs = {n: make_run(n, preset, [*data, *per_class, *_tokenizer_args(learned.get(n), tok_dirs), *overrides,
                                    *budget_args, *([f"method.pairs={pairs_dir}"] if n == "get" else [])])
            for n in names}  # validate all before any work
    tok_preset = "tiny" if preset == "tiny" else "cpu"  # the tokenizer presets: seconds (tests) or minutes
    tok_data = [*data, *(o for o in overrides if o.startswith("data."))]
    tok_cfgs = {kind: make_config(kind, tok_preset, tok_data) for kind in tok_dirs}
    if not tok_dirs:
        _dry_build(runs)  # data and budget too (e.g. less than one step), before --out is created
    out.mkdir(parents=True, exist_ok=True)
    rows, t_start = [], time.perf_counter()
    for kind, cfg in tok_cfgs.items():  # the tokenizers first: every run of that family encodes with them
        t0 = time.perf_counter()
        metrics = train_tokenizer(cfg, tok_dirs[kind], progress=progress)
        if progress:
            click.echo(f"tokenizer {kind}: PSNR {metrics.get('psnr')}, rFD {metrics.get('rfd')} "
                       f"({time.perf_counter() - t0:.0f} s)", err=True)
    if tok_dirs:
        _dry_build(runs)
    for name, run in runs.items():
        extra = _teacher_pairs(out, pairs_dir, num_pairs, progress) if name == "get" else {}
        t0 = time.perf_counter()
        train(run, out / name, progress=progress)
        train_wall = time.perf_counter() - t0
        # Without guidance first, then as configured (its samples and metrics.json stay in the run dir).
        guided = PARADIGMS[name].guided and run.sample.guidance.on  # GET has no guidance
        variants = [apply(run.sample, {"guidance.scale": 1.0}, "sample.")] if guided else []
        for sampling in variants + [run.sample]:
            t1 = time.perf_counter()
            row = evaluate_run(out / name, sampling=sampling)
            row.update(train_wall_s=train_wall, eval_wall_s=time.perf_counter() - t1, fd=row[_fd_key(row)],
                       sampling_short=short_sampling(row["sampling"]), **extra)
            rows.append(row)
            if progress:
                click.echo(f"{name} ({row['sampling_short']}): class acc {row['class_accuracy']:.3f}, "
                           f"FD {row['fd']:.2f}", err=True)
    summary = {"train_flops_budget": budget, "preset": preset, "overrides": overrides,
               "wall_s": time.perf_counter() - t_start, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    data_name = _fd_key(rows[0]).removeprefix("fd_")
    md = table(rows, data_name)
    atomic_write_text(out / "results.md", f"# isynth compare ({data_name}, {preset}, {budget:.2e} training FLOPs "
                      f"each)\n\n{md}\n\n"
                      + "".join(f"![{n}]({n}/samples.png)\n" for n in runs))
    click.echo(md)
    click.echo(f"\nwall time {summary['wall_s']:.0f} s; table, samples and grids in {out}")
    return rows


def _fd_key(row: dict) -> str:
    """The key of the row's Fréchet distance, named after the dataset (`fd_digits`, `fd_shapes`, ...)."""
    return next(k for k in row if k.startswith("fd_") and k != "fd_train_vs_eval")


def _tokenizer_args(kind: str | None, dirs: dict[str, Path]) -> list[str]:
    if kind is None:
        return []
    return [f"tokenizer.kind={kind}", f"tokenizer.path={dirs[kind]}", *LEARNED_TOKENS[kind]]


def _dry_build(runs: dict) -> None:
    """Build every run on the meta device (shapes only, no memory): data, tokenizer and budget are checked."""
    for name, run in runs.items():
        with torch.device("meta"):
            build(run, torch.device("meta"), check_data=name != "get")  # get's pairs come later


def _teacher_pairs(out: Path, pairs_dir: Path, num_pairs: int, progress: bool) -> dict:
    """Generate (or resume) get's pairs from the teacher run; the teacher's training and the pairs' sampling
    are get's cost too (shown in their own columns)."""
    t0 = time.perf_counter()
    m = generate_pairs(out / TEACHER, num_pairs, pairs_dir, progress=progress)
    return {"teacher_train_flops": m["teacher"]["train_flops"],
            "pair_flops": m["num_pairs"] * m["teacher_sample_flops_per_pair"], "num_pairs": m["num_pairs"],
            "pairs_wall_s": time.perf_counter() - t0}
