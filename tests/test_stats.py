"""Statistics of sweeps on hand-computed values: summaries over seeds, bootstrap odds and rankings, log-linear
fits recovering a known slope, the compute-optimal size and Pareto fronts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from isynth.errors import IsynthError
from isynth.stats import (
    GROUP_KEYS,
    LABELS,
    METRICS,
    aggregate,
    compute_optimal,
    fit_predict,
    fits,
    inference_fronts,
    loglinear_fit,
    pareto_front,
    prob_beats,
    rankings,
    summarize,
)


def _row(paradigm="ar", size="cpu", budget=1e12, seed=0, axes=None, sampling="", **metrics):
    return {"paradigm": paradigm, "size": size, "budget": budget, "seed": seed, "axes": axes or {},
            "sampling_short": sampling, **metrics}


def test_every_metric_has_a_label():
    assert set(METRICS) <= set(LABELS)
    assert METRICS["fd"] is False and METRICS["class_accuracy"] is True and METRICS["images_per_s"] is True


def test_summarize_matches_hand_computed_student_t_interval():
    s = summarize([1, 2, 3, 4])
    assert s["n"] == 4 and s["mean"] == 2.5
    assert s["std"] == pytest.approx(1.2909944, rel=1e-6)
    half = 3.182446 * 1.2909944 / 2  # t(0.975, 3 dof) * std / sqrt(4)
    assert s["ci_low"] == pytest.approx(2.5 - half, rel=1e-5) and s["ci_high"] == pytest.approx(2.5 + half, rel=1e-5)
    assert s["values"] == [1.0, 2.0, 3.0, 4.0]


def test_summarize_skips_missing_values_and_one_seed_gives_no_interval():
    s = summarize([None, 3.0, float("nan"), float("inf")])
    assert s["n"] == 1 and s["missing"] == 3
    assert s["mean"] == s["ci_low"] == s["ci_high"] == 3.0 and math.isnan(s["std"])
    empty = summarize([None])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    same = summarize([2.0, 2.0, 2.0])
    assert same["std"] == 0.0 and same["ci_low"] == same["ci_high"] == 2.0


def test_aggregate_groups_by_everything_but_the_seed():
    rows = [_row(seed=1, fd=10.0, nll_bits_per_token=None, train_flops=1e12),
            _row(seed=0, fd=12.0, nll_bits_per_token=None, train_flops=1e12),
            _row(paradigm="mdm", fd=5.0),
            _row(seed=0, axes={"b": 1, "a": 2}, fd=1.0),
            _row(seed=1, axes={"a": 2, "b": 1}, fd=3.0),
            _row(seed=0, sampling="guidance.scale=2.0", fd=7.0)]
    groups = aggregate(rows)
    assert len(groups) == 4
    g = groups[0]
    assert {k: g[k] for k in GROUP_KEYS} == {"paradigm": "ar", "size": "cpu", "budget": 1e12, "axes": {},
                                             "sampling_short": ""}
    assert g["seeds"] == [0, 1] and g["fd"]["mean"] == 11.0 and g["train_flops"]["mean"] == 1e12
    assert "nll_bits_per_token" not in g and "class_accuracy" not in g
    assert groups[1]["paradigm"] == "mdm" and groups[1]["fd"]["n"] == 1
    assert groups[2]["axes"] == {"b": 1, "a": 2} and groups[2]["fd"]["mean"] == 2.0  # key order does not matter
    assert groups[3]["sampling_short"] == "guidance.scale=2.0"


def test_prob_beats_separated_identical_and_deterministic():
    a, b = [1.0, 1.1, 0.9, 1.05], [2.0, 2.1, 1.9, 2.05]
    assert prob_beats(a, b, higher_is_better=False) == 1.0
    assert prob_beats(a, b, higher_is_better=True) == 0.0
    assert prob_beats([3.0, 3.0], [3.0, 3.0], True) == 0.5
    assert prob_beats([0.1, 0.2, 0.7], [0.1, 0.2, 0.7], True) == pytest.approx(0.5, abs=0.03)
    assert prob_beats([1.0], [2.0], True) == 0.0 and prob_beats([2.0], [1.0], True) == 1.0
    assert prob_beats([1.0], [1.0], True) == 0.5
    noisy_a, noisy_b = [1.0, 2.0, 3.0], [1.5, 2.5, 2.0]
    p = prob_beats(noisy_a, noisy_b, True, seed=3)
    assert 0.0 < p < 1.0 and p == prob_beats(noisy_a, noisy_b, True, seed=3)
    with pytest.raises(IsynthError):
        prob_beats([None], [1.0], True)


def test_rankings_orders_paradigms_and_resolves_only_clear_winners():
    rows = []
    for seed in range(4):
        rows += [_row("diffusion", seed=seed, fd=10.0 + 0.1 * seed), _row("ar", seed=seed, fd=20.0 + 0.1 * seed),
                 _row("mdm", seed=seed, fd=30.0 + seed, nll_bits_per_token=1.0)]
        rows += [_row("diffusion", budget=2e12, seed=seed, fd=10.0 + seed),
                 _row("ar", budget=2e12, seed=seed, fd=10.5 + seed)]
    clear, close = rankings(rows, "fd")
    assert clear["budget"] == 1e12 and clear["higher_is_better"] is False
    assert [e["paradigm"] for e in clear["entrants"]] == ["diffusion", "ar", "mdm"]
    assert clear["best"] == "diffusion" and clear["entrants"][0]["p_best_beats"] is None
    assert clear["entrants"][1]["p_best_beats"] == 1.0 and clear["p_beats_all"] == 1.0 and clear["resolved"]
    assert close["best"] == "diffusion" and 0.5 < close["p_beats_all"] < 0.95 and not close["resolved"]
    nll = rankings(rows, "nll_bits_per_token")[0]
    assert [e["label"] for e in nll["entrants"]] == ["mdm"] and sorted(nll["missing"]) == ["ar", "diffusion"]
    assert nll["p_beats_all"] is None and not nll["resolved"]


def test_rankings_one_seed_is_never_resolved_and_sampler_settings_become_entrants():
    rows = [_row("ar", fd=1.0), _row("mdm", fd=9.0)]
    only = rankings(rows, "fd")[0]
    assert only["p_beats_all"] == 1.0 and not only["resolved"]
    rows = [_row("ar", seed=s, sampling=f"guidance.scale={g}", fd=g + 0.01 * s) for s in range(3) for g in (1, 3)]
    r = rankings(rows, "fd", by=("size", "budget"))[0]
    assert [e["label"] for e in r["entrants"]] == ["ar guidance.scale=1", "ar guidance.scale=3"] and r["resolved"]
    with pytest.raises(IsynthError, match="unknown metric"):
        rankings(rows, "fid")
    with pytest.raises(IsynthError, match="cannot rank by"):
        rankings(rows, "fd", by=("paradigm",))


def _synthetic_scaling(seed=1, noise=0.05):
    """FD-like data exactly log-linear in compute, 3 seeds at each of 5 budgets, with seeded noise."""
    rng = np.random.default_rng(seed)
    x = np.repeat(np.logspace(12, 14, 5), 3)
    return x, 5.0 - 3.0 * np.log10(x) + rng.normal(0.0, noise, x.size)


def test_loglinear_fit_recovers_a_known_slope():
    x, y = _synthetic_scaling()
    fit = loglinear_fit(x, y)
    lo, hi = fit["slope_ci"]
    assert lo <= -3.0 <= hi and hi - lo < 0.2 and fit["n"] == 15 and fit["n_x"] == 5 and fit["r2"] > 0.99
    assert fit_predict(fit, [1e13])[0] == pytest.approx(5.0 - 39.0, abs=0.1)
    # The 95% interval covers the true slope in about 95% of noise draws (seed 1 above is one of them).
    covered = [lo <= -3.0 <= hi for lo, hi in (loglinear_fit(*_synthetic_scaling(s))["slope_ci"] for s in range(200))]
    assert 0.9 <= np.mean(covered) <= 0.99
    logfit = loglinear_fit(x, 10.0 ** (1.0 - 0.5 * np.log10(x / 1e12)), log_y=True)
    assert logfit["slope"] == pytest.approx(-0.5) and fit_predict(logfit, [1e13])[0] == pytest.approx(10 ** 0.5)


def test_loglinear_fit_refuses_too_few_points():
    with pytest.raises(IsynthError, match="at least 3 points"):
        loglinear_fit([1e12, 1e13], [1.0, 2.0])
    with pytest.raises(IsynthError, match="2 or more distinct x"):
        loglinear_fit([1e12] * 4, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(IsynthError, match="at least 3 points"):
        loglinear_fit([1e12, 1e13, 1e14], [1.0, None, 2.0])
    with pytest.raises(IsynthError, match="positive"):
        loglinear_fit([0.0, 1e13, 1e14], [1.0, 2.0, 3.0])
    flat = loglinear_fit([1e12, 1e13, 1e14], [2.0, 2.0, 2.0])
    assert flat["slope"] == 0.0 and flat["slope_ci"] == [0.0, 0.0] and math.isnan(flat["r2"])


def test_fits_one_per_series_and_skips_short_ones():
    x, y = _synthetic_scaling()
    rows = [_row(budget=float(b), seed=i % 3, fd=float(v), train_flops=float(b)) for i, (b, v) in enumerate(zip(x, y))]
    rows += [_row("mdm", budget=1e12, fd=3.0), _row("mdm", budget=1e13, fd=2.0)]
    ar, mdm = fits(rows, "fd")
    assert ar["skipped"] is None and ar["slope_ci"][0] <= -3.0 <= ar["slope_ci"][1] and ar["x"] == "train_flops"
    assert mdm["paradigm"] == "mdm" and "at least 3 points" in mdm["skipped"] and "slope" not in mdm


def test_compute_optimal_picks_the_best_size_per_budget():
    rows = []
    for seed in range(2):
        for budget, best in ((1e12, "small"), (1e14, "large")):
            for size in ("small", "large"):
                fd = 10.0 if size == best else 20.0
                rows.append(_row("ar", size=size, budget=budget, seed=seed, fd=fd + seed, train_flops=budget))
    optimal = compute_optimal(aggregate(rows), "fd")
    assert [(o["budget"], o["size"]) for o in optimal] == [(1e12, "small"), (1e14, "large")]
    assert optimal[0]["summary"]["mean"] == 10.5 and len(optimal[0]["candidates"]) == 2
    acc = compute_optimal(aggregate([_row(size="s", class_accuracy=0.5), _row(size="l", class_accuracy=0.9)]),
                          "class_accuracy")
    assert acc[0]["size"] == "l" and compute_optimal(aggregate(rows), "recall") == []


def test_pareto_front_on_a_hand_made_set():
    #        0 front   1 dominated by 0   2 front   3 front    4 dominated by 2   5 duplicate of 3
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 7.0), (10.0, 9.0), (11.0, 7.0), (10.0, 9.0)]
    assert pareto_front(points, higher_is_better=True) == [0, 2, 3, 5]
    lower = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0)]
    assert pareto_front(lower, higher_is_better=False) == [0, 1, 3]
    assert pareto_front([], True) == [] and pareto_front([(1.0, float("nan")), (2.0, 1.0)], True) == [1]


def test_inference_fronts_per_budget_with_flops_and_throughput():
    rows = [_row("ar", fd=10.0, sample_flops_per_image=1e8, images_per_s=500.0),
            _row("ar", sampling="steps=2", fd=12.0, sample_flops_per_image=5e7, images_per_s=900.0),
            _row("diffusion", fd=8.0, sample_flops_per_image=1e9, images_per_s=50.0),
            _row("mdm", fd=11.0, sample_flops_per_image=2e8, images_per_s=100.0),
            _row("ar", budget=2e12, fd=9.0, sample_flops_per_image=1e8, images_per_s=450.0)]
    first, second = inference_fronts(aggregate(rows), "fd")
    assert [first["points"][i]["label"] for i in first["front"]] == ["ar steps=2", "ar", "diffusion"]
    assert [p["on_front"] for p in first["points"]] == [True, True, True, False] and second["front"] == [0]
    fast = inference_fronts(aggregate(rows), "fd", cost="images_per_s")[0]
    assert fast["higher_is_cheaper"] and [fast["points"][i]["label"] for i in fast["front"]] == [
        "ar steps=2", "ar", "diffusion"]
    with pytest.raises(IsynthError, match="unknown sampling cost"):
        inference_fronts(aggregate(rows), "fd", cost="seconds")
    assert inference_fronts(aggregate(rows), "nll_bits_per_token") == []
