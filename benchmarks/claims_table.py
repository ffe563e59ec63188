"""The verdicts of `isynth claim` runs as markdown: one row per test (effect and its 95% interval), and one
per arm (mean ± sample standard deviation over seeds of FD-digits and class accuracy).

    python benchmarks/claims_table.py runs/claims            # every ID/verdict.json below it
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _spread(xs: list[float]) -> str:
    a = np.array(xs, dtype=float)
    return f"{a.mean():.3g} ± {a.std(ddof=1):.2g}" if len(a) > 1 else f"{a.mean():.3g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    found = sorted(args.root.glob("*/verdict.json"), key=lambda p: int(p.parent.name.lstrip("C") or 0))
    print("| claim | test | effect [95% CI] | verdict | claim verdict | seeds | wall (min) |")
    print("|---|---|---|---|---|---|---|")
    for path in found:
        v = json.loads(path.read_text())
        for i, t in enumerate(v["tests"]):
            lo, hi = t["ci"]
            head = (v["claim"], v["verdict"], ", ".join(map(str, v["seeds"])), f"{v['wall_s'] / 60:.1f}") if i == 0 \
                else ("", "", "", "")
            print(f"| {head[0]} | {t['test']} | {t['effect']:+.3g} [{lo:+.3g}, {hi:+.3g}] | {t['verdict']} | {head[1]} "
                  f"| {head[2]} | {head[3]} |")
    print()
    print("| claim | arm | FD-digits | class acc | sampling FLOPs/img |")
    print("|---|---|---|---|---|")
    for path in found:
        v = json.loads(path.read_text())
        for arm, rows in v["values"].items():
            rows = list(rows.values())
            print(f"| {v['claim']} | {arm} | {_spread([r['fd'] for r in rows])} | "
                  f"{_spread([r['class_accuracy'] for r in rows])} | {rows[0]['sample_flops_per_image']:.3g} |")


if __name__ == "__main__":
    main()
