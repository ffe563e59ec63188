"""Figures of sweeps and compare runs, in the manner of Kilian et al. 2024 ("Computational Tradeoffs in Image
Synthesis"): quality against training compute and against sampling cost on a log axis, one colour per
paradigm, one marker per model size, error bars of the 95% interval over seeds, fitted log-linear trends
dashed with their slope.

Every function writes a PNG (150 dpi) and an SVG next to the given stem and returns the written paths; each
file goes to a temporary name and is renamed into place, so a killed report leaves no half-written figure.
Figures are built with matplotlib's object API (Figure, not pyplot): nothing is registered in pyplot's
global state, so nothing stays open between calls and no interactive backend is ever chosen. A function
with nothing to draw (e.g. NLL for diffusion-only groups) writes nothing and returns [].
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from isynth.errors import IsynthError
from isynth.files import atomic_path
from isynth.stats import INFERENCE_COSTS, LABELS, METRICS, fit_predict, group_label, inference_fronts

DPI = 150
# One fixed colour per paradigm, so a paradigm looks the same in every figure of a report (tab10).
COLOURS = {"ar": "#1f77b4", "rar": "#17becf", "maskgit": "#2ca02c", "mdm": "#bcbd22", "mar": "#ff7f0e",
           "ar-cont": "#9467bd", "diffusion": "#d62728", "get": "#8c564b"}
FALLBACK = ["#e377c2", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
# Variants of one paradigm (sampler settings, swept axes) share its colour and differ in marker fill and line.
FILLS = ["full", "none", "left", "bottom", "right", "top"]
LINES = ["-", "-.", ":", (0, (3, 1, 1, 1, 1, 1))]


class _Style:
    """Colours by paradigm, markers by size and fills by variant for one figure: known paradigms keep their
    colour, others take the fallback colours in sorted order; sizes take markers from smallest to largest
    model (mean parameters where the groups have them, first-seen order otherwise); a paradigm's sampler
    settings and axes take fills and line styles in first-seen order."""

    def __init__(self, groups: Sequence[dict]):
        others = sorted({g["paradigm"] for g in groups} - COLOURS.keys())
        self.colours = {**COLOURS, **{p: FALLBACK[i % len(FALLBACK)] for i, p in enumerate(others)}}
        params: dict = {}
        for g in groups:
            p = g.get("params")
            p = float(p.get("mean", math.nan) if isinstance(p, dict) else math.nan if p is None else p)
            params.setdefault(g["size"], []).extend([p] if math.isfinite(p) else [])
        first = list(params)
        order = sorted(first, key=lambda s: (np.mean(params[s]) if params[s] else math.inf, first.index(s)))
        self.markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(order)}
        self.variants: dict[str, list] = {}
        for g in groups:
            seen = self.variants.setdefault(g["paradigm"], [])
            if _variant(g) not in seen:
                seen.append(_variant(g))

    def look(self, entry: dict) -> dict:
        """matplotlib keyword arguments for an entry's series: colour, marker, fill and line style."""
        k = self.variants.get(entry["paradigm"], [_variant(entry)]).index(_variant(entry))
        return {"color": self.colour(entry["paradigm"]), "marker": self.marker(entry.get("size")),
                "fillstyle": FILLS[k % len(FILLS)], "markerfacecoloralt": "white", "ls": LINES[k % len(LINES)]}

    def colour(self, paradigm: str) -> str:
        return self.colours[paradigm]

    def marker(self, size) -> str:
        return self.markers.get(size, "o")


def _variant(entry: dict) -> tuple:
    return entry.get("sampling_short", ""), str(sorted((entry.get("axes") or {}).items()))


def axis_label(key: str) -> str:
    """The axis name of a metric or cost, saying which way is better (the axis itself is never flipped)."""
    name = LABELS.get(key, key)
    if key in INFERENCE_COSTS:
        return f"{name} (higher is cheaper)" if INFERENCE_COSTS[key] else name
    if key in METRICS:
        return f"{name} ({'higher' if METRICS[key] else 'lower'} is better)"
    return name


def _save(fig: Figure, stem: str | Path) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = Path(f"{stem}.{ext}")
        # A fixed SVG id salt and no date make the SVG the same bytes for the same data.
        with atomic_path(path) as tmp, matplotlib.rc_context({"svg.hashsalt": "isynth"}):
            fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight",
                        metadata={"Date": None} if ext == "svg" else None)
        paths.append(path)
    return paths


def _legend(fig: Figure, ax, handles: dict) -> None:
    if handles:
        ax.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False)


def _has(group: dict, key: str) -> bool:
    return isinstance(group.get(key), dict) and group[key].get("n", 0) > 0


def _yerr(s: dict) -> list[list[float]]:
    lo, hi = s["ci_low"], s["ci_high"]
    return [[max(s["mean"] - lo, 0.0)], [max(hi - s["mean"], 0.0)]]


def _train_x(group: dict) -> float:
    tf = group.get("train_flops", {}).get("mean", math.nan) if isinstance(group.get("train_flops"), dict) else math.nan
    return tf if math.isfinite(tf) and tf > 0 else float(group["budget"])


def _series_key(entry: dict) -> tuple:
    return (entry["paradigm"], entry.get("size"), str(sorted((entry.get("axes") or {}).items())),
            entry.get("sampling_short", ""))


def _training_axes(fig: Figure, ax, metric: str, title: str, handles: dict, stem: str | Path) -> list[Path]:
    """Log training-FLOPs x axis, labels, title, grid and legend; then save."""
    ax.set_xscale("log")
    ax.set_xlabel(LABELS["train_flops"])
    ax.set_ylabel(axis_label(metric))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax, handles)
    return _save(fig, stem)


def quality_vs_training(aggregated: Iterable[dict], metric: str, fits: Iterable[dict] | None,
                        stem: str | Path) -> list[Path]:
    """Mean `metric` ± its 95% interval against training FLOPs (the group's mean train_flops, else its
    budget), one solid line per (paradigm, size, axes, sampler), and the log-linear fits of `fits`
    (isynth.stats.fits for the same metric) dashed in the same colour with slope per decade and interval."""
    groups = [g for g in aggregated if _has(g, metric)]
    if not groups:
        return []
    style = _Style(groups)
    series: dict[tuple, list[dict]] = {}
    for g in groups:
        series.setdefault(_series_key(g), []).append(g)
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    handles: dict = {}
    for key, members in series.items():
        members = sorted(members, key=_train_x)
        g0 = members[0]
        label = group_label(g0, ("paradigm", "size", "axes", "sampling_short"))
        xs, ys = [_train_x(g) for g in members], [g[metric]["mean"] for g in members]
        err = np.hstack([_yerr(g[metric]) for g in members])
        handles[label] = ax.errorbar(xs, ys, yerr=err, ms=5, lw=1.2, capsize=3, **style.look(g0))
    for f in fits or []:
        if f.get("skipped") or f.get("metric", metric) != metric or _series_key(f) not in series:
            continue
        x = np.logspace(math.log10(f["x_range"][0]), math.log10(f["x_range"][1]), 50)
        lo, hi = f["slope_ci"]
        what = "log10 slope" if f["log_y"] else "slope"
        label = (f"{group_label(f, ('paradigm', 'size', 'axes', 'sampling_short'))} fit: {what} {f['slope']:+.3g}"
                 f"/decade [{lo:+.3g}, {hi:+.3g}]")
        (handles[label],) = ax.plot(x, fit_predict(f, x), ls="--", lw=1.0, color=style.colour(f["paradigm"]))
    return _training_axes(fig, ax, metric, f"{LABELS.get(metric, metric)} against training compute (95% CI over "
                          "seeds)", handles, stem)


def quality_vs_inference(aggregated: Iterable[dict], metric: str, stem: str | Path,
                         cost: str = "sample_flops_per_image") -> list[Path]:
    """Mean `metric` against a sampling cost (isynth.stats.INFERENCE_COSTS), one panel per training budget,
    every group a point with its 95% intervals and the Pareto front of that budget as a grey step line: the
    best quality reachable at each cost (for images/s, at each required throughput). Log x axis."""
    aggregated = list(aggregated)
    fronts = inference_fronts(aggregated, metric, cost)
    if not fronts:
        return []
    style = _Style([g for g in aggregated if _has(g, metric) and _has(g, cost)])
    ncols = min(len(fronts), 3)
    nrows = math.ceil(len(fronts) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 2.0, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    handles: dict = {}
    for ax, fr in zip(axes.flat, fronts):
        for p in fr["points"]:
            xerr = [[max(p["cost"] - p["cost_ci"][0], 0.0)], [max(p["cost_ci"][1] - p["cost"], 0.0)]]
            h = ax.errorbar([p["cost"]], [p["quality"]], xerr=xerr, yerr=_yerr({**p, "mean": p["quality"]}),
                            ms=6, capsize=3, **style.look(p),  # on the front: a black edge
                            mec="black" if p["on_front"] else style.colour(p["paradigm"]),
                            mew=1.5 if p["on_front"] else 1.0)
            handles.setdefault(p["label"], h)
        front = sorted((fr["points"][i] for i in fr["front"]), key=lambda p: p["cost"])
        if front:
            ax.step([p["cost"] for p in front], [p["quality"] for p in front], color="0.4", lw=1.0, ls="-",
                    where="pre" if fr["higher_is_cheaper"] else "post", zorder=0)
            handles.setdefault("Pareto front", Line2D([], [], color="0.4", lw=1.0))
        if all(p["cost"] > 0 for p in fr["points"]):
            ax.set_xscale("log")
        ax.set_title(f"budget {fr['budget']:.2g} training FLOPs", fontsize=9)
        ax.set_xlabel(axis_label(cost), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(fronts):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(axis_label(metric))
    fig.suptitle(f"{LABELS.get(metric, metric)} against sampling cost (95% CI over seeds)", fontsize=10)
    _legend(fig, axes[0, -1], handles)
    return _save(fig, stem)


def frontier(optimal: Iterable[dict], metric: str, stem: str | Path) -> list[Path]:
    """The compute-optimal frontier (isynth.stats.compute_optimal): per paradigm, the best size's mean
    `metric` ± 95% interval at each budget against training FLOPs, each point marked and annotated with
    the size that won there."""
    optimal = [o for o in optimal if o.get("metric", metric) == metric and o["summary"].get("n", 0) > 0]
    if not optimal:
        return []
    # Every size that competed gets its marker, so a size keeps the marker it has in the other figures.
    style = _Style([{**o, **c} for o in optimal for c in o["candidates"]])
    series: dict[tuple, list[dict]] = {}
    for o in optimal:
        series.setdefault((o["paradigm"], str(sorted(o["axes"].items())), o["sampling_short"]), []).append(o)
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    handles: dict = {}
    for members in series.values():
        members = sorted(members, key=lambda o: o["train_flops"])
        look = style.look(members[0])
        colour = look["color"]
        xs, ys = [o["train_flops"] for o in members], [o["summary"]["mean"] for o in members]
        (line,) = ax.plot(xs, ys, color=colour, lw=1.2, ls=look["ls"])
        for o, x, y in zip(members, xs, ys):
            ax.errorbar([x], [y], yerr=_yerr(o["summary"]), ms=6, capsize=3, **{**style.look(o), "ls": ""})
            ax.annotate(str(o["size"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        handles[group_label(members[0], ("paradigm", "axes", "sampling_short"))] = line
    return _training_axes(fig, ax, metric, f"Compute-optimal {LABELS.get(metric, metric)}: best model size per budget",
                          handles, stem)


def sample_grid_sheet(grids: Sequence[tuple[str, str | Path]], stem: str | Path, columns: int = 4) -> list[Path]:
    """A contact sheet of existing sample-grid images, each under its label, `columns` to a row."""
    if columns < 1:
        raise IsynthError("a contact sheet needs at least one column")
    if not grids:
        return []
    images = []
    for label, path in grids:
        try:
            with Image.open(path) as im:
                images.append((label, np.asarray(im.convert("L") if im.mode in ("L", "I", "I;16", "1")
                                                 else im.convert("RGB"))))
        except OSError as e:
            raise IsynthError(f"{path}: unreadable sample grid ({e})") from None
    ncols = min(columns, len(images))
    nrows = math.ceil(len(images) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (label, img) in zip(axes.flat, images):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    return _save(fig, stem)


def claim_arms(values: dict[str, dict[str, dict]], metrics: Sequence[str], stem: str | Path) -> list[Path]:
    """One panel per metric: each arm's value at every seed (dots) and their mean (bar), arms in the claim's
    order (`isynth claim`: values[arm][seed] = that run's metrics row)."""
    arms = list(values)
    fig = Figure(figsize=(max(4.0, 1.1 * len(arms)) * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, arm in enumerate(arms):
            ys = [row[metric] for row in values[arm].values() if row.get(metric) is not None]
            if not ys:
                continue
            ax.bar(i, float(np.mean(ys)), color=FALLBACK[i % len(FALLBACK)], alpha=0.35, width=0.7)
            ax.plot([i] * len(ys), ys, "o", color=FALLBACK[i % len(FALLBACK)], ms=4)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(axis_label(metric))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, stem)


def loss_curves(runs: Sequence[str | Path], stem: str | Path) -> list[Path]:
    """Training loss against training FLOPs (log axis) of one or more run directories, from their
    `log.jsonl`, one line per run, labelled by the directory's name and paradigm."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    drawn = 0
    for i, run in enumerate(runs):
        run = Path(run)
        log = run / "log.jsonl"
        if not log.is_file():
            raise IsynthError(f"{run}: no log.jsonl (not a run directory, or no step logged yet)")
        recs = [r for r in map(_json_line, log.read_text().splitlines()) if r and "loss" in r]
        if not recs:
            continue
        paradigm = _json_line((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
        name = (paradigm or {}).get("paradigm", "")
        colour = COLOURS.get(name, FALLBACK[i % len(FALLBACK)]) if len(runs) == 1 else FALLBACK[i % len(FALLBACK)]
        ax.plot([r["train_flops"] for r in recs], [r["loss"] for r in recs], color=colour,
                label=f"{run.name} ({name})" if name else run.name)
        drawn += 1
    if not drawn:
        raise IsynthError("nothing to plot: the runs have no logged loss")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("training loss (mean over each log window)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def _json_line(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
