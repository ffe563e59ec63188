"""`isynth compare`, the main job: every paradigm trained at the same training-FLOPs budget on digits,
evaluated with the same metrics, tabulated with the compute each one spent (Kilian et al. 2024's
protocol at laptop scale). Re-running resumes finished and unfinished runs alike.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import click
import torch

from isynth.checkpoint import atomic_write_text
from isynth.errors import IsynthError
from isynth.eval.run_eval import evaluate_run
from isynth.paradigms import PARADIGMS
from isynth.presets import make_run
from isynth.trainer import build, train

# Training FLOPs per paradigm in the default main job: 353 steps of the `cpu` preset, ~100 s on 2 cores.
# At 1e13 (235 steps) RAR's random-order first half left its result seed-sensitive (class accuracy
# 0.63-0.93 over seeds); at 1.5e13 three seeds agree (BENCHMARKS.md).
DEFAULT_TRAIN_FLOPS = 1.5e13

COLUMNS = [  # (header, key, format)
    ("paradigm", "paradigm", "{}"),
    ("params", "params", "{:,}"),
    ("train FLOPs", "train_flops", "{:.2e}"),
    ("steps", "step", "{}"),
    ("class acc", "class_accuracy", "{:.3f}"),
    ("FD-digits", "fd_digits", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("IS", "inception_score", "{:.2f}"),
    ("memorised", "memorization_rate", "{:.3f}"),
    ("NLL bits/tok", "nll_bits_per_token", "{:.3f}"),
    ("sample FLOPs/img", "sample_flops_per_image", "{:.2e}"),
    ("NFE", "nfe", "{}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("train s", "train_wall_s", "{:.0f}"),
    ("sampling", "sampling_short", "{}"),
]


def _short_sampling(s: dict) -> str:
    keys = [k for k in ("cfg_scale", "cfg_pow", "temperature", "top_k", "top_p", "kv_cache", "num_steps") if k in s]
    return " ".join(f"{k}={s[k]}" for k in keys)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_compare(out: Path, names: list[str] | None, preset: str, train_flops: float | None,
                overrides: list[str], progress: bool = True) -> list[dict]:
    names = names or list(PARADIGMS)
    unknown = [n for n in names if n not in PARADIGMS]
    if unknown:
        raise IsynthError(f"unknown paradigm {unknown[0]!r}; choose from {', '.join(PARADIGMS)}")
    budget = DEFAULT_TRAIN_FLOPS if train_flops is None else train_flops
    if not (budget > 0 and math.isfinite(budget)):
        raise IsynthError(f"--flops must be a finite number > 0, got {budget}")
    budget_args = [f"train.train_flops={budget}", "train.max_steps=none"]
    runs = {n: make_run(n, preset, [*overrides, *budget_args]) for n in names}  # validate all before any work
    for run in runs.values():  # data and budget too (e.g. less than one step), before --out is created
        with torch.device("meta"):  # shapes only, no memory
            build(run, torch.device("meta"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t_start = [], time.perf_counter()
    for name, run in runs.items():
        t0 = time.perf_counter()
        train(run, out / name, progress=progress)
        train_wall = time.perf_counter() - t0
        # Without guidance first, then as configured (its samples and metrics.json stay in the run dir).
        variants = [dataclasses.replace(run.sample, cfg_scale=1.0)] if run.sample.cfg_scale != 1.0 else []
        for sampling in variants + [run.sample]:
            t1 = time.perf_counter()
            row = evaluate_run(out / name, sampling=sampling)
            row.update(train_wall_s=train_wall, eval_wall_s=time.perf_counter() - t1,
                       sampling_short=_short_sampling(row["sampling"]))
            rows.append(row)
            if progress:
                click.echo(f"{name} (cfg {sampling.cfg_scale}): class acc {row['class_accuracy']:.3f}, "
                           f"FD-digits {row['fd_digits']:.2f}", err=True)
    summary = {"train_flops_budget": budget, "preset": preset, "overrides": overrides,
               "wall_s": time.perf_counter() - t_start, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    md = table(rows)
    atomic_write_text(out / "results.md", f"# isynth compare ({preset}, {budget:.2e} training FLOPs each)\n\n{md}\n\n"
                      + "".join(f"![{n}]({n}/samples.png)\n" for n in runs))
    click.echo(md)
    click.echo(f"\nwall time {summary['wall_s']:.0f} s; table, samples and grids in {out}")
    return rows
