"""Statistics of sweeps and compare runs: per-group summaries over seeds, bootstrap rankings of paradigms,
log-linear fits of quality against compute, the compute-optimal model size per budget and Pareto fronts of
quality against sampling cost.

A run produces rows (plain dicts), one per evaluated (cell, sampler setting). Rows that differ only in their
seed form a group; a group's spread over seeds is the only noise estimate a sweep has, so every mean here
comes with a 95% Student-t interval and every ranking with a bootstrap probability. Kilian et al. 2024
("Computational Tradeoffs in Image Synthesis") compare paradigms by quality against training and sampling
compute; Geng et al. 2023 (GET) report FID log-linear in training compute, hence `loglinear_fit`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats as sps

from isynth.errors import IsynthError

# Metric key -> higher is better. Missing or None values are normal: NLL exists only for token paradigms,
# held-out accuracy only on the shapes dataset.
METRICS: dict[str, bool] = {
    "fd": False,
    "class_accuracy": True,
    "heldout_class_accuracy": True,
    "precision": True,
    "recall": True,
    "inception_score": True,
    "memorization_rate": False,
    "nll_bits_per_token": False,
    "sample_flops_per_image": False,
    "images_per_s": True,
}
LABELS: dict[str, str] = {
    "fd": "FD",
    "class_accuracy": "class accuracy",
    "heldout_class_accuracy": "held-out accuracy",
    "precision": "precision",
    "recall": "recall",
    "inception_score": "IS",
    "memorization_rate": "memorised fraction",
    "nll_bits_per_token": "NLL bits/token",
    "sample_flops_per_image": "sampling FLOPs/image",
    "images_per_s": "images/s",
    "train_flops": "training FLOPs",
    "params": "parameters",
    "nfe": "function evaluations/image",
    "budget": "training FLOPs budget",
}
# Compute and size fields summarised next to the metrics: the x axes of the figures and fits.
EXTRA = ("train_flops", "params", "nfe")
# Sampling costs a Pareto front may use -> a higher value is cheaper (throughput rather than work).
INFERENCE_COSTS: dict[str, bool] = {"sample_flops_per_image": False, "nfe": False, "images_per_s": True}
GROUP_KEYS = ("paradigm", "size", "budget", "axes", "sampling_short")
CONFIDENCE = 0.95


def _finite(values: Iterable) -> np.ndarray:
    out = []
    for v in values:
        if v is None or isinstance(v, bool):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return np.asarray(out, dtype=float)


def summarize(values: Iterable) -> dict:
    """n, mean, std (ddof=1), the 95% Student-t interval of the mean and the values themselves.

    None and non-finite values are left out (`missing` counts them). One seed gives no interval: ci_low and
    ci_high then equal the mean and std is nan, so a figure draws no error bar rather than a made-up one.
    No values at all give n=0 and nan everywhere."""
    values = list(values)
    x = _finite(values)
    n = len(x)
    out = {"n": n, "missing": len(values) - n, "mean": math.nan, "std": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "values": x.tolist()}
    if n == 0:
        return out
    mean = float(x.mean())
    out.update(mean=mean, ci_low=mean, ci_high=mean)
    if n >= 2:
        std = float(x.std(ddof=1))
        half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def _canonical(axes) -> str:
    return json.dumps(axes or {}, sort_keys=True, default=str)


def _key(row: dict, keys: Sequence[str]) -> tuple:
    return tuple(_canonical(row.get("axes")) if k == "axes" else (row.get(k) or "") if k == "sampling_short"
                 else row.get(k) for k in keys)


def aggregate(rows: Iterable[dict], metrics: dict[str, bool] = METRICS) -> list[dict]:
    """One dict per group of rows that differ only in their seed, in first-seen order.

    Shape: {paradigm, size, budget, axes (dict), sampling_short, seeds (sorted, as given), n_rows,
    <metric>: summarize(...) for each metric (and each of EXTRA) with a value in any row of the group}."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_key(row, GROUP_KEYS), []).append(row)
    out = []
    for key, members in groups.items():
        first = members[0]
        group = {k: v for k, v in zip(GROUP_KEYS, key)}
        group["axes"] = dict(first.get("axes") or {})
        group["seeds"] = sorted(r["seed"] for r in members if r.get("seed") is not None)
        group["n_rows"] = len(members)
        for m in [*metrics, *(e for e in EXTRA if e not in metrics)]:
            if any(r.get(m) is not None for r in members):
                group[m] = summarize(r.get(m) for r in members)
        out.append(group)
    return out


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples of x with replacement (one row of indices per resample)."""
    return x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)


def _oriented(means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    return means if higher_is_better else -means


def _ties(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # The same multiset of values summed in another order may differ in the last bits: that is a tie.
    return np.isclose(a, b, rtol=1e-12, atol=0.0)


def prob_beats(a: Iterable, b: Iterable, higher_is_better: bool, n_boot: int = 10000, seed: int = 0) -> float:
    """Bootstrap probability that A's mean beats B's: the seeds of each are resampled with replacement,
    independently, n_boot times; ties count half. One value each gives 1, 0 or 0.5."""
    xa, xb = _finite(a), _finite(b)
    if len(xa) == 0 or len(xb) == 0:
        raise IsynthError("prob_beats needs at least one finite value on each side")
    rng = np.random.default_rng(seed)
    ma = _oriented(_boot_means(xa, n_boot, rng), higher_is_better)
    mb = _oriented(_boot_means(xb, n_boot, rng), higher_is_better)
    tie = _ties(ma, mb)
    return float(np.mean(np.where(tie, 0.5, ma > mb)))


def _prob_best(samples: list[np.ndarray], higher_is_better: bool, n_boot: int, seed: int) -> float:
    """Bootstrap probability that the first sample's mean beats all the others at once; a tie at the top
    with k others counts 1/(k+1), as a two-way tie counts half in prob_beats."""
    rng = np.random.default_rng(seed)
    means = np.stack([_oriented(_boot_means(x, n_boot, rng), higher_is_better) for x in samples])
    best, rest = means[0], means[1:]
    tied = _ties(rest, best).sum(axis=0)
    wins = np.all((best > rest) | _ties(rest, best), axis=0)
    return float(np.mean(np.where(wins, 1.0 / (1 + tied), 0.0)))


def _higher_is_better(metric: str) -> bool:
    if metric not in METRICS:
        raise IsynthError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric]


def group_label(entrant: dict, keys: Sequence[str]) -> str:
    """A short name for a group from some of its keys: paradigm and size bare, axes as name=value, the
    sampler label as is (left out when default)."""
    parts = []
    for k in keys:
        v = entrant.get(k)
        if k in ("paradigm", "size"):
            parts.append(str(v))
        elif k == "axes":
            parts.extend(f"{a}={b}" for a, b in sorted((v or {}).items()))
        elif v not in (None, ""):
            parts.append(str(v) if k == "sampling_short" else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def rankings(rows: Iterable[dict], metric: str, by: Sequence[str] = ("size", "budget", "axes", "sampling_short"),
             n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Paradigms ranked by their mean metric within each combination of the `by` keys, with bootstrap odds.

    An entrant is a paradigm together with the group keys not in `by` (e.g. its sampler setting when
    `by` leaves sampling_short out); its label names them. Shape, one dict per combination in first-seen
    order: {<by keys>, metric, higher_is_better, entrants: [{label, paradigm, <other keys>, n, mean, std,
    ci_low, ci_high, p_best_beats (None for the best)}] best first, best (label), missing (labels with no
    value), p_beats_all, resolved}. p_beats_all is the bootstrap probability that the best mean beats every
    other at once (None with a single entrant). resolved is p_beats_all >= 0.95 and every entrant has at
    least two seeds: a single value per entrant resamples to itself and would claim certainty."""
    higher = _higher_is_better(metric)
    by = tuple(by)
    unknown = [k for k in by if k not in GROUP_KEYS or k == "paradigm"]
    if unknown:
        raise IsynthError(f"cannot rank by {', '.join(unknown)}; use some of {', '.join(GROUP_KEYS[1:])}")
    entrant_keys = tuple(k for k in GROUP_KEYS if k not in by)
    buckets: dict[tuple, dict[tuple, list[dict]]] = {}
    for row in rows:
        buckets.setdefault(_key(row, by), {}).setdefault(_key(row, entrant_keys), []).append(row)
    out = []
    for bkey, entrants in buckets.items():
        first_row = next(iter(entrants.values()))[0]
        result = {k: v for k, v in zip(by, bkey)}
        if "axes" in by:
            result["axes"] = dict(first_row.get("axes") or {})
        result.update(metric=metric, higher_is_better=higher)
        listed, missing = [], []
        for members in entrants.values():
            info = {k: (dict(members[0].get("axes") or {}) if k == "axes" else members[0].get(k)) for k in entrant_keys}
            info["label"] = group_label(info, entrant_keys)
            s = summarize(r.get(metric) for r in members)
            if s["n"] == 0:
                missing.append(info["label"])
                continue
            info.update({k: s[k] for k in ("n", "mean", "std", "ci_low", "ci_high")}, values=s["values"])
            listed.append(info)
        listed.sort(key=lambda e: -e["mean"] if higher else e["mean"])  # stable: first seen wins ties
        for i, e in enumerate(listed):
            e["p_best_beats"] = None if i == 0 else prob_beats(listed[0]["values"], e["values"], higher, n_boot, seed)
        p_all = (_prob_best([np.asarray(e["values"]) for e in listed], higher, n_boot, seed)
                 if len(listed) >= 2 else None)
        for e in listed:
            del e["values"]
        result.update(entrants=listed, best=listed[0]["label"] if listed else None, missing=missing,
                      p_beats_all=p_all,
                      resolved=bool(p_all is not None and p_all >= CONFIDENCE and all(e["n"] >= 2 for e in listed)))
        out.append(result)
    return out


def loglinear_fit(x: Iterable, y: Iterable, log_y: bool = False) -> dict:
    """Least-squares fit of y = intercept + slope * log10(x) (log10 y when log_y) over all points given.

    Fit over every seed's point rather than the means, so the slope's interval reflects the seed noise.
    Returns {slope, intercept, slope_stderr, slope_ci: [low, high] (95%, Student t with n-2 degrees of
    freedom), r2, n, n_x (distinct x), x_range: [min, max], log_y}. Pairs with a missing or non-finite
    value are dropped first. Constant y fits slope 0 exactly, with a zero-width interval and r2 nan."""
    pairs = [(a, b) for a, b in zip(x, y) if len(_finite([a])) and len(_finite([b]))]
    xs = np.asarray([float(a) for a, _ in pairs])
    ys = np.asarray([float(b) for _, b in pairs])
    if np.any(xs <= 0) or (log_y and np.any(ys <= 0)):
        raise IsynthError("a log-linear fit needs positive x" + (" and y" if log_y else ""))
    if len(xs) < 3 or len(np.unique(xs)) < 2:
        raise IsynthError(f"a log-linear fit needs at least 3 points at 2 or more distinct x "
                          f"(got {len(xs)} points at {len(np.unique(xs))} x)")
    lx, ly = np.log10(xs), np.log10(ys) if log_y else ys
    if np.all(ly == ly[0]):
        slope, intercept, stderr, r2 = 0.0, float(ly[0]), 0.0, math.nan
    else:
        fit = sps.linregress(lx, ly)
        slope, intercept, stderr, r2 = float(fit.slope), float(fit.intercept), float(fit.stderr), float(fit.rvalue**2)
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, len(xs) - 2)) * stderr
    return {"slope": slope, "intercept": intercept, "slope_stderr": stderr, "slope_ci": [slope - half, slope + half],
            "r2": r2, "n": len(xs), "n_x": int(len(np.unique(xs))), "x_range": [float(xs.min()), float(xs.max())],
            "log_y": log_y}


def fit_predict(fit: dict, x) -> np.ndarray:
    """The fitted metric at x (undoing the log of y for a log_y fit)."""
    y = fit["intercept"] + fit["slope"] * np.log10(np.asarray(x, dtype=float))
    return 10.0**y if fit["log_y"] else y


def fits(rows: Iterable[dict], metric: str, x: str = "train_flops", log_y: bool = False) -> list[dict]:
    """One log-linear fit of `metric` against `x` per (paradigm, size, axes, sampling_short), over the
    budgets and seeds of that series, in first-seen order.

    Shape: {paradigm, size, axes, sampling_short, metric, x, skipped: None or the reason, **loglinear_fit}
    (the fit's fields only when not skipped). A row without `x` falls back to its budget when x is
    train_flops, the budget being what the row was trained to."""
    keys = ("paradigm", "size", "axes", "sampling_short")
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault(_key(row, keys), []).append(row)
    out = []
    for key, members in series.items():
        result = {k: v for k, v in zip(keys, key)}
        result.update(axes=dict(members[0].get("axes") or {}), metric=metric, x=x, skipped=None)
        xs = [r.get(x) if r.get(x) is not None else r.get("budget") if x == "train_flops" else None
              for r in members]
        try:
            result.update(loglinear_fit(xs, [r.get(metric) for r in members], log_y=log_y))
        except IsynthError as e:
            result["skipped"] = str(e)
        out.append(result)
    return out


def compute_optimal(aggregated: Iterable[dict], metric: str) -> list[dict]:
    """Per (paradigm, budget, axes, sampling_short), the model size with the best mean `metric`: the
    compute-optimal frontier over sizes (Kilian et al. 2024), in first-seen order.

    Shape: {paradigm, budget, axes, sampling_short, metric, size, summary (the best group's summarize
    dict), train_flops (its mean, or the budget), candidates: [{size, params (mean or None), n, mean, ci_low,
    ci_high}]}. Series where no size has a value are left out."""
    higher = _higher_is_better(metric)
    series: dict[tuple, list[dict]] = {}
    for g in aggregated:
        if g.get(metric, {}).get("n", 0) > 0:
            series.setdefault(_key(g, ("paradigm", "budget", "axes", "sampling_short")), []).append(g)
    out = []
    for members in series.values():
        best = (max if higher else min)(members, key=lambda g: g[metric]["mean"])
        tf = best.get("train_flops", {}).get("mean", math.nan)
        out.append({"paradigm": best["paradigm"], "budget": best["budget"], "axes": dict(best.get("axes") or {}),
                    "sampling_short": best.get("sampling_short", ""), "metric": metric, "size": best["size"],
                    "summary": best[metric], "train_flops": tf if math.isfinite(tf) else best["budget"],
                    "candidates": [{"size": g["size"], "params": g.get("params", {}).get("mean"),
                                    **{k: g[metric][k] for k in ("n", "mean", "ci_low", "ci_high")}} for g in members]})
    return out


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the (cost, quality) points no other point dominates, sorted by cost (ascending).

    A point is dominated by one with no higher cost and no worse quality, strictly better in one of the
    two; identical points do not dominate each other. Non-finite points are never on the front."""
    if len(points) == 0:
        return []
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    cost, q = p[:, 0], _oriented(p[:, 1], higher_is_better)
    ok = np.isfinite(cost) & np.isfinite(q)
    c, qq = cost[:, None], q[:, None]  # [i, j]: does j dominate i?
    dominated = ((cost[None] <= c) & (q[None] >= qq) & ((cost[None] < c) | (q[None] > qq)) & ok[None]).any(axis=1)
    front = np.flatnonzero(ok & ~dominated)
    return [int(i) for i in front[np.lexsort((-q[front], cost[front]))]]


def inference_fronts(aggregated: Iterable[dict], metric: str, cost: str = "sample_flops_per_image") -> list[dict]:
    """Per budget, every group as a (sampling cost, quality) point and the Pareto front among them.

    `cost` is one of INFERENCE_COSTS; for images_per_s more is cheaper, so the front is taken on the
    negated throughput and runs from the fastest point. Shape, one dict per budget in first-seen order:
    {budget, metric, cost, higher_is_better, higher_is_cheaper, points: [{label, paradigm, size, axes,
    sampling_short, cost, cost_ci: [low, high], quality, ci_low, ci_high, n, on_front}], front: [indices
    into points, cheapest first]}. Labels add the size and axes only where they vary within the budget."""
    higher = _higher_is_better(metric)
    if cost not in INFERENCE_COSTS:
        raise IsynthError(f"unknown sampling cost {cost!r}; choose one of {', '.join(INFERENCE_COSTS)}")
    cheaper_up = INFERENCE_COSTS[cost]
    budgets: dict = {}
    for g in aggregated:
        if g.get(metric, {}).get("n", 0) > 0 and g.get(cost, {}).get("n", 0) > 0:
            budgets.setdefault(g["budget"], []).append(g)
    out = []
    for budget, members in budgets.items():
        shown = ["paradigm", "sampling_short"]
        shown[1:1] = [k for k in ("size", "axes") if len({_key(g, (k,)) for g in members}) > 1]
        points = []
        for g in members:
            m, c = g[metric], g[cost]
            points.append({"label": group_label(g, shown), "paradigm": g["paradigm"], "size": g["size"],
                           "axes": dict(g.get("axes") or {}), "sampling_short": g.get("sampling_short", ""),
                           "cost": c["mean"], "cost_ci": [c["ci_low"], c["ci_high"]], "quality": m["mean"],
                           "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": m["n"]})
        front = pareto_front([(-p["cost"] if cheaper_up else p["cost"], p["quality"]) for p in points], higher)
        for i, p in enumerate(points):
            p["on_front"] = i in front
        out.append({"budget": budget, "metric": metric, "cost": cost, "higher_is_better": higher,
                    "higher_is_cheaper": cheaper_up, "points": points, "front": front})
    return out
