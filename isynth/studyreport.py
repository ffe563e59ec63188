"""`isynth report DIR`: the tables with confidence intervals, the fits, the figures and the sample grids of a
sweep (`isynth sweep`) or a compare run (`isynth compare`), in one self-contained `report.html` (report.py),
with the figures also as PNG and SVG under `DIR/figures/`. Quality is read as Kilian et al. 2024 read it:
against training FLOPs (with log-linear fits, as GET's FID against training compute, Geng et al. 2023),
against inference cost (Pareto fronts over sampler settings), and the compute-optimal size per budget.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from isynth import figures, stats
from isynth.errors import IsynthError
from isynth.files import atomic_write_text, read_json
from isynth.report import ReportData, environment, write_report
from isynth.sweep import GRID_FILE, RESULTS, collect

REPORT, FIGURES = "report.html", "figures"
# The table's metrics, in order: (row key, header)
TABLE_METRICS = (("fd", "FD"), ("class_accuracy", "class acc"), ("heldout_class_accuracy", "held-out acc"),
                 ("precision", "precision"), ("recall", "recall"), ("nll_bits_per_token", "NLL bits/tok"),
                 ("sample_flops_per_image", "sample FLOPs/img"), ("nfe", "NFE"), ("images_per_s", "images/s"))
METRICS = dict(stats.METRICS, class_error=False)  # prompt-following error, 1 - class accuracy
LABELS_TO_FIT = ("fd", "class_error")


def _num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3g}" if abs(x) >= 1e4 or abs(x) < 1e-2 and x != 0 else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def mean_ci(s: dict | None) -> str:
    """`mean ± half-width` of a summary's 95% interval; the mean alone for one seed (no interval)."""
    if not s or not s.get("n"):
        return "—"
    if s["n"] < 2:
        return _num(s["mean"])
    return f"{_num(s['mean'])} ± {_num((s['ci_high'] - s['ci_low']) / 2)}"


def load_rows(out: Path) -> tuple[str, list[dict], dict]:
    """(kind, rows, results) of a sweep or compare directory; compare rows get the sweep's cell keys."""
    if (out / GRID_FILE).exists():
        results = collect(out)
        return "sweep", results["rows"], results
    if not (out / RESULTS).exists():
        raise IsynthError(f"{out} is neither a sweep ({GRID_FILE}) nor a compare run ({RESULTS}): nothing to report")
    results = read_json(out / RESULTS, "compare results")
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise IsynthError(f"{out / RESULTS}: not the results of isynth compare or isynth sweep (no rows)")
    rows = [{"size": results.get("preset", "cpu"), "budget": results.get("train_flops_budget"), "seed": 0,
             "axes": {}, "run_dir": r.get("paradigm"), **r} for r in results["rows"]]
    return "compare", rows, results


def _with_error(rows: list[dict]) -> list[dict]:
    return [r | ({"class_error": 1 - r["class_accuracy"]} if r.get("class_accuracy") is not None else {})
            for r in rows]


def _cell_table(agg: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    present = [(k, h) for k, h in TABLE_METRICS if any(g.get(k) for g in agg)]
    header = ["paradigm", "size", "train FLOPs", "sampling", "seeds", *(h for _, h in present)]
    body = [[g["paradigm"], g["size"], f"{g['budget']:.3g}", g["sampling_short"] or "configured",
             ",".join(map(str, g["seeds"])), *(mean_ci(g.get(k)) for k, _ in present)] for g in agg]
    return ("Every cell: mean ± half-width of the 95% confidence interval over seeds (Student t; intervals, "
            "standard deviations and every seed's value in results.json)", header, body)


def _ranking_table(rows: list[dict], metric: str) -> tuple[tuple, list[str]]:
    """Per budget and size, among the paradigms at their configured sampler: the best, and P(best beats
    each other) by bootstrap over seeds."""
    configured = [r for r in rows if r.get("configured", True)]
    ranks = stats.rankings(configured, metric, by=("size", "budget", "axes"))
    header = ["size", "train FLOPs", "best", "mean", "P(best beats each other)", "resolved (P >= 0.95 vs all)"]
    body, findings = [], []
    for r in ranks:
        if not r["entrants"]:
            continue
        best = r["entrants"][0]
        others = ", ".join(f"{e['label']} {e['p_best_beats']:.2f}" for e in r["entrants"][1:]
                           if e.get("p_best_beats") is not None)
        body.append([r["size"], f"{r['budget']:.3g}", best["label"], _num(best["mean"]), others or "—",
                     "yes" if r["resolved"] else "no"])
        findings.append(f"{stats.LABELS.get(metric, metric)} at {r['budget']:.3g} FLOPs ({r['size']}): best "
                        f"{best['label']} ({_num(best['mean'])}), " + ("resolved by the seeds" if r["resolved"] else
                                                                       "not resolved by the seeds"))
    caption = f"Ranking by {stats.LABELS.get(metric, metric)} (configured samplers; bootstrap over seeds)"
    return (caption, header, body), findings


def pairwise(rows: list[dict], metric: str) -> dict:
    """P(A beats B) by bootstrap over seeds, for every ordered pair of paradigms at each (size, budget),
    configured samplers: {"size budget": {A: {B: p}}}."""
    higher = METRICS[metric]
    out: dict = {}
    cells: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if r.get("configured", True) and r.get(metric) is not None:
            cells.setdefault((r["size"], r["budget"]), {}).setdefault(r["paradigm"], []).append(r[metric])
    for (size, budget), by in cells.items():
        out[f"{size} {budget:.3g}"] = {a: {b: stats.prob_beats(va, vb, higher) for b, vb in by.items() if b != a}
                                       for a, va in by.items()}
    return out


def _pairwise_tables(matrices: dict, metric: str, keep: list[str]) -> list[tuple]:
    tables = []
    for key in keep:
        m = matrices[key]
        names = list(m)
        body = [[a, *("—" if a == b else f"{m[a][b]:.2f}" for b in names)] for a in names]
        tables.append((f"P(row beats column) by {stats.LABELS.get(metric, metric)} at {key} training FLOPs "
                       "(bootstrap over seeds; every (size, budget) in pairwise.json)", ["", *names], body))
    return tables


def _fit_table(all_fits: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    header = ["metric", "paradigm", "size", "sampling", "slope per decade of training FLOPs", "95% CI", "R²", "n",
              "note"]
    body = []
    for f in all_fits:
        if f["skipped"]:
            body.append([f["metric"], f["paradigm"], f["size"], f["sampling_short"] or "configured", "—", "—", "—", "—",
                         f["skipped"]])
        else:
            lo, hi = f["slope_ci"]
            body.append([f["metric"], f["paradigm"], f["size"], f["sampling_short"] or "configured", _num(f["slope"]),
                         f"[{_num(lo)}, {_num(hi)}]", _num(f["r2"]), str(f["n"]), ""])
    return "Log-linear fits: metric = a + b·log10(training FLOPs), over every seed's point", header, body


def _optimal_table(optimal: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    header = ["paradigm", "train FLOPs", "sampling", "best size", "FD of each size (mean [95% CI])"]
    body = [[o["paradigm"], f"{o['budget']:.3g}", o["sampling_short"] or "configured", o["size"],
             "; ".join(f"{c['size']} {_num(c['mean'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
                       for c in o["candidates"])] for o in optimal]
    return "Compute-optimal size per budget (lowest mean FD, configured samplers)", header, body


def build_report(out: Path) -> Path:
    """Write `out/report.html` (and `out/figures/*`) for the sweep or compare run in `out`."""
    out = Path(out)
    kind, rows, results = load_rows(out)
    if not rows:
        raise IsynthError(f"{out}: no finished cell yet, nothing to report")
    rows = _with_error(rows)
    agg = stats.aggregate(rows, METRICS)
    fig_dir = out / FIGURES
    fig_dir.mkdir(exist_ok=True)
    fit_rows = [r for r in rows if r.get("configured", True)]
    all_fits = [f for m in LABELS_TO_FIT for f in stats.fits(fit_rows, m)]
    fd_fits = [f for f in all_fits if f["metric"] == "fd"]
    optimal = stats.compute_optimal([g for g in agg if not g["sampling_short"]], "fd")  # configured samplers
    # Training curves at the configured samplers, one figure per size (the other samplers are inference points)
    configured = [g for g in agg if not g["sampling_short"]]
    sizes = list(dict.fromkeys(g["size"] for g in configured))
    made = []
    for size in sizes:
        at = [g for g in configured if g["size"] == size]
        suffix = "" if len(sizes) == 1 else f"_{size}"
        made += [(f"FD against training FLOPs, {size} (mean and 95% CI over seeds; dashed: log-linear fits)",
                  figures.quality_vs_training(at, "fd", [f for f in fd_fits if f["size"] == size],
                                              fig_dir / f"fd_vs_training{suffix}")),
                 (f"Class accuracy against training FLOPs, {size}",
                  figures.quality_vs_training(at, "class_accuracy", None, fig_dir / f"accuracy_vs_training{suffix}"))]
    made += [("FD against sampling FLOPs per image, per budget (grey: Pareto front over sampler settings)",
             figures.quality_vs_inference(agg, "fd", fig_dir / "fd_vs_sample_flops")),
            ("FD against measured images/s, per budget (grey: Pareto front)",
             figures.quality_vs_inference(agg, "fd", fig_dir / "fd_vs_images_per_s", cost="images_per_s")),
            ("Compute-optimal model size per budget (lowest mean FD)",
             figures.frontier(optimal, "fd", fig_dir / "frontier"))]
    if any(g.get("heldout_class_accuracy") for g in agg):
        made.append(("Held-out combinations: class accuracy against training FLOPs",
                     figures.quality_vs_training(configured, "heldout_class_accuracy", None,
                                                 fig_dir / "heldout_vs_training")))
    figs = [(caption, paths[0]) for caption, paths in made if paths]
    grids = _grids(out, rows)
    if grids:
        figures.sample_grid_sheet(grids, fig_dir / "samples")
    tables = [_cell_table(agg)]
    findings = []
    for metric in ("fd", "class_accuracy"):
        table, found = _ranking_table(rows, metric)
        tables.append(table)
        findings.extend(found)
    matrices = {m: pairwise(rows, m) for m in ("fd", "class_accuracy")}
    atomic_write_text(out / "pairwise.json", json.dumps(matrices, indent=2) + "\n")
    for m, by in matrices.items():  # shown: the largest budget of each size
        largest = {}
        for key in by:
            size, budget = key.rsplit(" ", 1)
            if float(budget) >= largest.get(size, (-1.0, ""))[0]:
                largest[size] = (float(budget), key)
        tables += _pairwise_tables(by, m, [k for _, k in largest.values()])
    if len({r["size"] for r in rows}) > 1:
        tables.append(_optimal_table(optimal))
    seeds = sorted({r["seed"] for r in rows})
    summary = [f"{kind}: {len({r.get('cell', r['run_dir']) for r in rows})} runs, {len(rows)} evaluations, "
               f"seeds {seeds}" + ("" if len(seeds) > 1 else " (one seed: no confidence intervals, and no ranking "
                                   "is resolved; use --seeds)"), *findings]
    summary += [f"slope of {f['metric']} for {f['paradigm']} ({f['size']}): {_num(f['slope'])} per decade "
                f"[{_num(f['slope_ci'][0])}, {_num(f['slope_ci'][1])}]" for f in all_fits if not f["skipped"]]
    data = ReportData(
        title=f"isynth {kind}: {out.name}", summary=summary, tables=tables, figures=figs, grids=grids,
        fits=[_fit_table(all_fits)], commands=results.get("commands") or [results.get("command", "")],
        configs=_configs(out, rows), environment=results.get("environment") or environment())
    return write_report(out / REPORT, data)


def _grids(out: Path, rows: list[dict]) -> list[tuple[str, Path]]:
    """The configured sampler's samples of each run at its first seed (one grid per cell of the table)."""
    seen, grids = set(), []
    for r in rows:
        key = (r["paradigm"], r["size"], r["budget"], json.dumps(r.get("axes") or {}, sort_keys=True))
        path = out / r["run_dir"] / "samples.png"
        if key not in seen and path.exists():
            seen.add(key)
            grids.append((f"{r['paradigm']} {r['size']} {r['budget']:.3g} FLOPs seed {r['seed']}", path))
    return grids


def _configs(out: Path, rows: list[dict]) -> dict[str, dict]:
    configs = {}
    for r in rows:
        path = out / r["run_dir"] / "config.json"
        name = f"{r['paradigm']} {r['size']}"
        if name not in configs and path.exists():
            configs[name] = read_json(path, "run config")
    return configs
