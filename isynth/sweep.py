"""`isynth sweep`: every cell of a grid (sweepgrid.py) is an ordinary run directory, trained and evaluated by
the same code as `isynth train` and `isynth eval`, under `DIR/cells/`. A cell is finished when its
`rows.json` exists (written atomically after its last evaluation), so a re-run skips finished cells and resumes
an interrupted one from its checkpoint (bit-exact, as `train` resumes); `--shard I/N` runs every N-th cell so
that N processes split a sweep without talking to each other.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from isynth.errors import IsynthError
from isynth.eval.run_eval import evaluate_run
from isynth.files import atomic_write_text, read_json
from isynth.overrides import apply, parse_overrides
from isynth.pairs import generate_pairs
from isynth.paradigms import PARADIGMS
from isynth.presets import make_run
from isynth.report import environment
from isynth.sweepgrid import STUDENT, Cell, Grid, grid_differences, read_grid, shard_cells
from isynth.trainer import build, train

GRID_FILE, CELLS, PAIRS, ROWS = "sweep.json", "cells", "pairs", "rows.json"
RESULTS, COMMANDS = "results.json", "commands.jsonl"
_ENTRIES = {GRID_FILE, CELLS, PAIRS, RESULTS, COMMANDS, "figures", "report.html"}  # what a sweep directory holds


def fd_key(row: dict) -> str:
    """The key of a metrics row's Fréchet distance, named after the dataset (`fd_digits`, `fd_shapes`, ...)."""
    return next(k for k in row if k.startswith("fd_") and k != "fd_train_vs_eval")


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
             "guidance.t_min": 0.0, "guidance.t_max": 1.0, "order": "raster"}
    if flat.get("guidance.schedule") != "pow-cosine":
        inert["guidance.pow"] = flat.get("guidance.pow")
    if flat.get("guidance.scale") == 1.0:
        inert |= {k: v for k, v in flat.items() if k.startswith("guidance.") and k != "guidance.scale"}
    if flat.get("head.sampler") != "dpm++":
        inert["head.order"] = flat.get("head.order")
    return " ".join(f"{k}={v}" for k, v in flat.items() if k not in inert or inert[k] != v)


def samplings(run, variants: tuple[str, ...] = (), unguided: bool = True) -> list:
    """The sampler settings a run is evaluated at: without guidance first (guided paradigms), then each
    variant (`sample.` fields, space-separated), then as configured, last (its samples stay in the run)."""
    out = []
    if unguided and PARADIGMS[run.paradigm].guided and run.sample.guidance.on:
        out.append(apply(run.sample, {"guidance.scale": 1.0}, "sample."))
    out += [sampling_variant(run, v) for v in variants]
    out.append(run.sample)
    return [s for i, s in enumerate(out) if s not in out[:i]]


def sampling_variant(run, fields: str):
    """The run's sampling config with `fields` applied: space-separated `field=value` (`sample.` optional)."""
    items = [x if x.startswith("sample.") else f"sample.{x}" for x in fields.split()]
    changes = {k.removeprefix("sample."): val for k, val in parse_overrides(items).items()}
    return apply(run.sample, changes, "sample.")


def teacher_pairs(teacher_dir: Path, pairs_dir: Path, num_pairs: int, progress: bool) -> dict:
    """Generate (or resume) get's (noise, image) pairs from its teacher run; the teacher's training and the
    pairs' sampling are get's cost too (shown in their own columns)."""
    t0 = time.perf_counter()
    m = generate_pairs(teacher_dir, num_pairs, pairs_dir, progress=progress)
    return {"teacher_train_flops": m["teacher"]["train_flops"],
            "pair_flops": m["num_pairs"] * m["teacher_sample_flops_per_pair"], "num_pairs": m["num_pairs"],
            "pairs_wall_s": time.perf_counter() - t0}


def train_and_evaluate(run, run_dir: Path, sampling_list: list, num_samples: int | None = None, seed: int = 0,
                       extra: dict | None = None, progress: bool = False) -> list[dict]:
    """Train `run` into `run_dir` (resuming) and evaluate it at each sampler setting: one row each."""
    t0 = time.perf_counter()
    train(run, run_dir, progress=progress)
    train_wall = time.perf_counter() - t0
    rows = []
    for k, sampling in enumerate(sampling_list):
        t1 = time.perf_counter()
        row = evaluate_run(run_dir, num_samples=num_samples, sampling=sampling, seed=seed)
        row.update(train_wall_s=train_wall, eval_wall_s=time.perf_counter() - t1, fd=row[fd_key(row)],
                   sampling_short=short_sampling(row["sampling"]), configured=k == len(sampling_list) - 1,
                   **(extra or {}))
        rows.append(row)
    return rows


def cell_run(grid: Grid, cell: Cell, out: Path):
    extra = [f"method.pairs={(out / PAIRS / cell.teacher.name).resolve()}"] if cell.paradigm == STUDENT else []
    return make_run(cell.paradigm, cell.size.preset, [*cell.overrides(grid), *extra])


def check_grid(grid: Grid, out: Path) -> dict[Cell, object]:
    """Every cell's config, built on the meta device (shapes only): unknown axes or values, data and budgets
    too small for one step fail here, before anything is written."""
    runs = {c: cell_run(grid, c, out) for c in grid.cells()}
    checked = set()
    for cell, run in runs.items():
        try:
            samplings(run, grid.variants_of(cell.paradigm), grid.unguided)
        except IsynthError as e:
            raise IsynthError(f"sampler variant of {cell.paradigm}: {e}") from None
        key = repr(replace(run, train=replace(run.train, seed=0)))
        if key in checked:  # seeds do not change shapes or budgets
            continue
        checked.add(key)
        with torch.device("meta"):
            try:
                build(run, torch.device("meta"), check_data=cell.paradigm != STUDENT)  # pairs come later
            except IsynthError as e:
                raise IsynthError(f"cell {cell.name}: {e}") from None
    return runs


def open_sweep(grid: Grid, out: Path) -> None:
    """Create `out` with its grid, or check that an existing sweep directory holds the same grid."""
    path = out / GRID_FILE
    if not path.exists():
        # Shards started together may both get here: they write the same grid, atomically. Hidden entries
        # are the temporary files of atomic writes.
        if out.exists() and any(p.name not in _ENTRIES and not p.name.startswith(".") for p in out.iterdir()):
            raise IsynthError(f"{out} exists and is not a sweep directory (no {GRID_FILE}): use another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(grid.to_json(), indent=2) + "\n")
    old = read_grid(path)
    if old != grid:
        diff = "; ".join(grid_differences(old, grid))
        raise IsynthError(f"{out} holds a sweep of another grid ({diff}): use another --out, or the same grid")


def run_cell(grid: Grid, cell: Cell, run, out: Path) -> list[dict]:
    cell_dir = out / CELLS / cell.name
    extra = {}
    if cell.paradigm == STUDENT:
        extra = teacher_pairs(out / CELLS / cell.teacher.name, out / PAIRS / cell.teacher.name, grid.num_pairs,
                              progress=False)
    rows = train_and_evaluate(run, cell_dir, samplings(run, grid.variants_of(cell.paradigm), grid.unguided),
                              grid.num_samples, seed=cell.seed, extra=extra)
    configured = _flat(asdict(run.sample))
    for r in rows:  # a sampler setting is named by what it changes (the configured one: "")
        changed = {k: v for k, v in _flat(r["sampling"]).items() if configured.get(k) != v}
        r.update(cell=cell.name, size=cell.size.name, budget=cell.budget, seed=cell.seed, axes=dict(cell.axes),
                 run_dir=f"{CELLS}/{cell.name}", sampling_short=" ".join(f"{k}={v}" for k, v in changed.items()))
    atomic_write_text(cell_dir / ROWS, json.dumps(rows, indent=2) + "\n")
    return rows


def run_sweep(grid: Grid, out: Path, shard: tuple[int, int] = (0, 1), progress: bool = True,
              command: str | None = None) -> dict:
    """Run this shard's unfinished cells, then write the rows of every finished cell."""
    out = Path(out)
    runs = check_grid(grid, out)
    open_sweep(grid, out)
    if command:  # every invocation (shards, resumptions), for the report; one appended line each, so that
        with open(out / COMMANDS, "a") as f:  # shards writing at the same time lose nothing
            f.write(json.dumps(command) + "\n")
    mine = shard_cells(grid.cells(), shard)
    bar = tqdm(total=len(mine), desc=f"sweep {shard[0]}/{shard[1]}", unit="cell", disable=not progress,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    for k, cell in enumerate(mine, 1):
        done = out / CELLS / cell.name / ROWS
        if done.exists():
            bar.update()
            continue
        t0 = time.perf_counter()
        rows = run_cell(grid, cell, runs[cell], out)
        if progress:
            r = rows[-1]
            acc = r.get("class_accuracy")
            tqdm.write(f"[{k}/{len(mine)}] {cell.name}: FD {r['fd']:.2f}"
                       + (f", class acc {acc:.3f}" if acc is not None else "")
                       + f" ({time.perf_counter() - t0:.0f} s)")
        bar.update()
    bar.close()
    summary = collect(out, grid)
    summary["wall_s"] = time.perf_counter() - t_start
    return summary


def collect(out: Path, grid: Grid | None = None) -> dict:
    """The rows of every finished cell of the sweep in `out`, in grid order, written to `results.json`."""
    out = Path(out)
    grid = grid or read_grid(out / GRID_FILE)
    cells = grid.cells()
    rows, missing = [], []
    for cell in cells:
        path = out / CELLS / cell.name / ROWS
        if path.exists():
            rows.extend(read_json(path, "cell rows"))
        else:
            missing.append(cell.name)
    commands = [json.loads(line) for line in (out / COMMANDS).read_text().splitlines() if line.strip()] \
        if (out / COMMANDS).exists() else []
    summary = {"grid": grid.to_json(), "cells_total": len(cells), "cells_done": len(cells) - len(missing),
               "missing": missing, "commands": commands, "environment": environment(), "rows": rows}
    atomic_write_text(out / RESULTS, json.dumps(summary, indent=2) + "\n")
    return summary
