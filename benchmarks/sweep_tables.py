"""Markdown tables of a finished sweep for BENCHMARKS.md: the best (paradigm, size) per budget by FD and by
class accuracy with the bootstrap odds, the log-linear slopes, and each paradigm's sampling cost.

    python benchmarks/sweep_tables.py runs/tradeoffs

Reads DIR/results.json (written by `isynth sweep`); configured samplers only, except in the cost table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from isynth import stats


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 100 else f"{x:.3f}"


def best_per_budget(rows: list[dict], metric: str) -> None:
    ranks = stats.rankings(rows, metric, by=("budget",))
    print(f"\n| training FLOPs | best by {metric} (paradigm size) | mean [95% CI] | runner-up "
          "| P(best beats runner-up) | P(best beats all) | resolved |\n|---|---|---|---|---|---|---|")
    for r in ranks:
        b, second = r["entrants"][0], r["entrants"][1]
        ci = f"{_fmt(b['mean'])} [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}]"
        print(f"| {r['budget']:.2g} | {b['label']} | {ci} | {second['label']} ({_fmt(second['mean'])}) | "
              f"{second['p_best_beats']:.2f} | {r['p_beats_all']:.2f} | {'yes' if r['resolved'] else 'no'} |")


def paradigm_at_budget(rows: list[dict], metric: str) -> None:
    """Each paradigm at its best size per budget: the mean over seeds, for the per-paradigm curve."""
    agg = stats.aggregate(rows)
    budgets = sorted({g["budget"] for g in agg})
    print("\n| paradigm | " + " | ".join(f"{b:.2g}" for b in budgets) + f" |  ({metric}, best size's mean ± CI "
          f"half-width)\n|---|" + "---|" * len(budgets))
    for p in dict.fromkeys(g["paradigm"] for g in agg):
        cells = []
        for b in budgets:
            groups = [g for g in agg if g["paradigm"] == p and g["budget"] == b and g.get(metric)]
            key = (lambda g: -g[metric]["mean"]) if stats.METRICS[metric] else (lambda g: g[metric]["mean"])
            g = sorted(groups, key=key)[0]
            s = g[metric]
            cells.append(f"{_fmt(s['mean'])} ± {_fmt((s['ci_high'] - s['ci_low']) / 2)} ({g['size']})")
        print(f"| {p} | " + " | ".join(cells) + " |")


def slopes(rows: list[dict], metric: str) -> None:
    print(f"\n| paradigm | size | slope of {metric} per decade of training FLOPs | 95% CI | R² |\n"
          "|---|---|---|---|---|")
    for f in stats.fits(rows, metric):
        if not f["skipped"]:
            lo, hi = f["slope_ci"]
            print(f"| {f['paradigm']} | {f['size']} | {f['slope']:.3f} | [{lo:.3f}, {hi:.3f}] | {f['r2']:.2f} |")


def sampling_cost(all_rows: list[dict]) -> None:
    agg = [g for g in stats.aggregate(all_rows) if g["budget"] == max(r["budget"] for r in all_rows)]
    print("\n| paradigm | size | sampler | sampling FLOPs/img | NFE | images/s | FD | class acc |\n"
          "|---|---|---|---|---|---|---|---|")
    for g in agg:
        cost = f"{g['sample_flops_per_image']['mean']:.3g} | {g['nfe']['mean']:.0f} | {g['images_per_s']['mean']:.0f}"
        print(f"| {g['paradigm']} | {g['size']} | {g['sampling_short'] or 'configured'} | {cost} | "
              f"{g['fd']['mean']:.1f} | {g['class_accuracy']['mean']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    args = ap.parse_args()
    results = json.loads((args.sweep / "results.json").read_text())
    all_rows = results["rows"]
    rows = [r for r in all_rows if r.get("configured", True)]
    print(f"{results['cells_done']} of {results['cells_total']} cells; seeds {sorted({r['seed'] for r in rows})}")
    for metric in ("fd", "class_accuracy"):
        best_per_budget(rows, metric)
        paradigm_at_budget(rows, metric)
    rows_err = [r | {"class_error": 1 - r["class_accuracy"]} for r in rows]
    slopes(rows, "fd")
    slopes(rows_err, "class_error")
    sampling_cost(all_rows)


if __name__ == "__main__":
    main()
