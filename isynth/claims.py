"""Published claims as small experiments with a verdict (`isynth claim ID`).

A claim has arms (runs: a paradigm with overrides, and optionally sampler settings applied at evaluation
only, so arms that differ only in sampling share one trained run) and tests. A comparison test says arm A
is better than arm B on a metric; with the same seeds in both arms the effect is the paired difference
per seed, oriented so that positive means "A better", and its 95% Student-t interval decides: above 0
`supported`, below 0 `not supported`, else `unresolved` (always so with one seed: no interval). A
non-inferiority test (`margin` > 0) asks only that A be no worse than B by more than margin x |B|: it is
supported when the interval's low end clears -margin x |B|. A slope test fits the metric against training
FLOPs over the arms (log-linear, isynth.stats) and asks for improvement with compute. The claim's verdict:
supported if every test is, not supported if any test is, else unresolved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats as sps

from isynth.errors import IsynthError
from isynth.stats import CONFIDENCE, METRICS, loglinear_fit

VERDICTS = ("supported", "not supported", "unresolved")


@dataclass(frozen=True)
class Arm:
    name: str
    paradigm: str
    overrides: tuple[str, ...] = ()  # training settings (section.field=value)
    sampling: tuple[str, ...] = ()   # sample.* settings at evaluation only
    budget: float | None = None      # training FLOPs, if not the claim's


@dataclass(frozen=True)
class Test:
    a: str                       # arm names; a slope test lists its arms in `over`
    b: str = ""
    metric: str = "fd"
    margin: float = 0.0          # > 0: non-inferiority, A no worse than B by more than margin x |mean B|
    over: tuple[str, ...] = ()   # slope test: the arms whose (training FLOPs, metric) points are fitted

    @property
    def label(self) -> str:
        if self.over:
            return f"{self.metric} improves with training FLOPs over {', '.join(self.over)}"
        rel = f"no worse than {self.b} (margin {self.margin:g})" if self.margin else f"better than {self.b}"
        return f"{self.a} {rel} by {self.metric}"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    statement: str
    arms: tuple[Arm, ...]
    tests: tuple[Test, ...]
    budget: float
    preset: str = "cpu"
    dataset: str | None = None
    num_samples: int = 1000
    teacher: tuple[str, ...] = ()    # settings of the `diffusion` teacher whose pairs `get` arms learn

    def __post_init__(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"claim {self.id}: arm names repeat")
        for t in self.tests:
            for n in t.over or (t.a, t.b):
                if n not in names:
                    raise ValueError(f"claim {self.id}: test names unknown arm {n!r}")
            if t.metric not in METRICS:
                raise ValueError(f"claim {self.id}: unknown metric {t.metric!r}")

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _better(metric: str) -> float:
    """+1 if higher is better for `metric`, -1 if lower is."""
    return 1.0 if METRICS[metric] else -1.0


def _interval(d: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of the values `d` (the mean twice when there is only one)."""
    mean = float(d.mean())
    if len(d) < 2:
        return mean, mean, mean
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def compare(a: dict[int, float], b: dict[int, float], metric: str, margin: float = 0.0) -> dict:
    """A against B on the seeds both have: effect = oriented paired difference (positive: A better)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise IsynthError("no seed has a value in both arms")
    sign = _better(metric)
    d = np.array([sign * (a[s] - b[s]) for s in seeds], dtype=float)
    mean, lo, hi = _interval(d)
    floor = -margin * abs(float(np.mean([b[s] for s in seeds]))) if margin else 0.0
    if len(seeds) < 2:
        verdict = "unresolved"
    elif lo > floor:
        verdict = "supported"
    elif hi < floor:
        verdict = "not supported"
    else:
        verdict = "unresolved"
    return {"seeds": seeds, "effect": mean, "ci": [lo, hi], "threshold": floor, "verdict": verdict,
            "a_mean": float(np.mean([a[s] for s in seeds])), "b_mean": float(np.mean([b[s] for s in seeds]))}


def slope(points: list[tuple[float, float]], metric: str) -> dict:
    """Log-linear fit of the metric against training FLOPs; supported when the slope's interval lies on the
    improving side of 0 (GET: FID log-linear in training compute)."""
    fit = loglinear_fit([x for x, _ in points], [y for _, y in points])
    sign = _better(metric)
    lo, hi = sorted(sign * v for v in fit["slope_ci"])
    verdict = "supported" if lo > 0 else "not supported" if hi < 0 else "unresolved"
    return {"effect": sign * fit["slope"], "ci": [lo, hi], "threshold": 0.0, "verdict": verdict, "fit": fit}


def overall(verdicts: list[str]) -> str:
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if "not supported" in verdicts:
        return "not supported"
    return "unresolved"


def judge(claim: Claim, values: dict[str, dict[int, dict]]) -> dict:
    """The verdict of `claim` from `values[arm][seed]` = that run's metrics row."""
    results = []
    for t in claim.tests:
        if t.over:
            pts = [(row.get("train_flops"), row.get(t.metric)) for arm in t.over for row in values[arm].values()]
            r = slope([p for p in pts if p[1] is not None], t.metric)
        else:
            pick = {arm: {s: row[t.metric] for s, row in values[arm].items() if row.get(t.metric) is not None}
                    for arm in (t.a, t.b)}
            r = compare(pick[t.a], pick[t.b], t.metric, t.margin)
        results.append({"test": t.label, "metric": t.metric, **r})
    return {"claim": claim.id, "paper": claim.paper, "statement": claim.statement,
            "verdict": overall([r["verdict"] for r in results]), "tests": results}
