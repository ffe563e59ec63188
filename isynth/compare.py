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

from isynth import stats
from isynth.errors import IsynthError
from isynth.files import atomic_write_text
from isynth.overrides import apply
from isynth.paradigms import PARADIGMS
from isynth.presets import MAIN_JOB_TRAIN_FLOPS, make_run
from isynth.report import environment
from isynth.studyreport import build_report, mean_ci
from isynth.sweep import fd_key, samplings, teacher_pairs, train_and_evaluate
from isynth.tokenizers.train import train_tokenizer
from isynth.tokenizers.trainconfig import make_config
from isynth.trainer import build

DEFAULT_TRAIN_FLOPS = MAIN_JOB_TRAIN_FLOPS

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


def table(rows: list[dict], data: str = "digits") -> str:
    lines = ["| " + " | ".join(h.format(data=data) for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEED_COLUMNS = (("class acc", "class_accuracy"), ("held-out acc", "heldout_class_accuracy"), ("FD-{data}", "fd"),
                ("precision", "precision"), ("recall", "recall"), ("NLL bits/tok", "nll_bits_per_token"),
                ("sample FLOPs/img", "sample_flops_per_image"), ("images/s", "images_per_s"))


def seed_table(rows: list[dict], data: str) -> str:
    """The compare table over several seeds: mean ± half-width of the 95% interval, per paradigm and sampler."""
    groups = stats.aggregate(rows)
    cols = [(h, k) for h, k in SEED_COLUMNS if any(g.get(k) for g in groups)]
    lines = ["| paradigm | sampling | seeds | " + " | ".join(h.format(data=data) for h, _ in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    for g in groups:
        seeds = ",".join(map(str, g["seeds"]))
        cells = [mean_ci(g.get(k)) for _, k in cols]
        lines.append(f"| {g['paradigm']} | {g['sampling_short']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_compare(out: Path, names: list[str] | None, preset: str, train_flops: float | None,
                overrides: list[str], progress: bool = True, num_pairs: int = DEFAULT_NUM_PAIRS,
                data: list[str] = (), seeds: int = 1, command: str = "") -> list[dict]:
    """Train and evaluate `names` (default: every paradigm) at one budget. `data` are `data.` settings of
    another dataset than digits: then a discrete and a continuous tokenizer are trained first (FSQ and KL, at
    the tokenizer preset `cpu`, or `tiny` with the tiny preset) and each paradigm takes the one of its token
    family. With `seeds` > 1 every paradigm is trained with `train.seed` 0..seeds-1 (seed k > 0 under
    `out/seed{k}/`) and the table shows the mean and 95% confidence interval over seeds."""
    names = names or list(PARADIGMS)
    unknown = [n for n in names if n not in PARADIGMS]
    if unknown:
        raise IsynthError(f"unknown paradigm {unknown[0]!r}; choose from {', '.join(PARADIGMS)}")
    if "get" in names and TEACHER not in names:
        raise IsynthError(f"get distils the {TEACHER} run's sampler: include {TEACHER} in --paradigms")
    if num_pairs < 1:
        raise IsynthError(f"--num-pairs must be >= 1, got {num_pairs}")
    if not 1 <= seeds <= 100:
        raise IsynthError(f"--seeds must be between 1 and 100, got {seeds}")
    names = sorted(names, key=list(PARADIGMS).index)  # the teacher trains before its student
    budget = DEFAULT_TRAIN_FLOPS if train_flops is None else train_flops
    if not (budget > 0 and math.isfinite(budget)):
        raise IsynthError(f"--flops must be a finite number > 0, got {budget}")
    budget_args = [f"train.train_flops={budget}", "train.max_steps=none"]
    out = Path(out)
    learned = {n: LEARNED[PARADIGMS[n].default_tokenizer.discrete] for n in names} if data else {}
    tok_dirs = {kind: out.resolve() / f"tokenizer-{kind}" for kind in set(learned.values())}
    # shapes: two samples of each of its 540 classes (unless the overrides say otherwise)
    per_class = ["train.eval_num_samples=1080"] if "data.name=shapes" in data else []
    pairs = [f"method.pairs={out.resolve() / PAIRS_DIR}"]
    runs = {n: make_run(n, preset, [*data, *per_class, *_tokenizer_args(learned.get(n), tok_dirs), *overrides,
                                    *budget_args, *(pairs if n == "get" else [])])
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
    for seed in range(seeds):
        base = out if seed == 0 else out / f"seed{seed}"
        for name, run in runs.items():
            run = apply(run, {"train.seed": seed} | ({"method.pairs": str(base.resolve() / PAIRS_DIR)}
                                                      if name == "get" else {}))
            extra = teacher_pairs(base / TEACHER, base / PAIRS_DIR, num_pairs, progress) if name == "get" else {}
            # Without guidance first, then as configured (its samples and metrics.json stay in the run dir).
            for row in train_and_evaluate(run, base / name, samplings(run), seed=seed, extra=extra,
                                          progress=progress):
                row.update(size=preset, budget=budget, seed=seed, axes={}, run_dir=str((base / name).relative_to(out)))
                rows.append(row)
                if progress:
                    click.echo(f"{name} seed {seed} ({row['sampling_short']}): class acc "
                               f"{row['class_accuracy']:.3f}, FD {row['fd']:.2f}", err=True)
    summary = {"train_flops_budget": budget, "preset": preset, "overrides": overrides, "command": command,
               "environment": environment(), "wall_s": time.perf_counter() - t_start, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    data_name = fd_key(rows[0]).removeprefix("fd_")
    md = table(rows, data_name) if seeds == 1 else seed_table(rows, data_name)
    atomic_write_text(out / "results.md", f"# isynth compare ({data_name}, {preset}, {budget:.2e} training FLOPs "
                      f"each)\n\n{md}\n\n"
                      + "".join(f"![{n}]({n}/samples.png)\n" for n in runs))
    report = build_report(out)
    click.echo(md)
    click.echo(f"\nwall time {summary['wall_s']:.0f} s; table, samples and grids in {out}; report: {report}")
    return rows


def _tokenizer_args(kind: str | None, dirs: dict[str, Path]) -> list[str]:
    if kind is None:
        return []
    return [f"tokenizer.kind={kind}", f"tokenizer.path={dirs[kind]}", *LEARNED_TOKENS[kind]]


def _dry_build(runs: dict) -> None:
    """Build every run on the meta device (shapes only, no memory): data, tokenizer and budget are checked."""
    for name, run in runs.items():
        with torch.device("meta"):
            build(run, torch.device("meta"), check_data=name != "get")  # get's pairs come later
