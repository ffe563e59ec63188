"""GET's learnability claim (Geng et al. 2023, sec. 5): a one-step student learns the teacher's (noise, image)
pairing, but not a random re-pairing of the same noise and images -- "the learnability of pairing measures its
quality".

    python benchmarks/get_pairing.py --pairs runs/compare/get-pairs --out runs/get-pairing --steps 600

Trains `get` twice with the same config, seed and steps: on the true pairs and with method.shuffle_pairs=true
(the images, with their labels, permuted against the noise), then prints the training loss of both over
the same steps and writes the two curves to OUT/loss.svg. The claim holds if the shuffled loss stays flat
while the true-pair loss falls.

A class-conditional student on shuffled pairs can still learn what the label says about the image (each
image keeps its label), so the script also prints the floor of any predictor that ignores the noise: the
loss of the per-class, per-pixel median (L1; mean for L2) with the training loss's weights over the unrolled
states. The true-pair loss going below that floor is what only the pairing can teach.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from isynth.pairformat import load_pairs
from isynth.presets import make_run
from isynth.trainer import train


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]  # event records (a new budget) have none


def svg(curves: dict[str, list[tuple[int, float]]], path: Path, w: int = 640, h: int = 360, pad: int = 50) -> None:
    """A dependency-free line plot (loss vs step) of several curves."""
    steps = [s for c in curves.values() for s, _ in c]
    vals = [v for c in curves.values() for _, v in c]
    x0, x1, y0, y1 = min(steps), max(steps), 0.0, max(vals) * 1.05
    sx = lambda s: pad + (s - x0) / max(1, x1 - x0) * (w - 2 * pad)  # noqa: E731
    sy = lambda v: h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">training step</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">training loss</text>']
    for frac in (0.0, 0.5, 1.0):
        v, s = y0 + frac * (y1 - y0), x0 + frac * (x1 - x0)
        parts.append(f'<text x="{pad - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
        parts.append(f'<text x="{sx(s):.1f}" y="{h - pad + 16}" text-anchor="middle">{s:.0f}</text>')
    for i, (name, c) in enumerate(curves.items()):
        pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in c)
        parts.append(f'<polyline fill="none" stroke="{colours[i % 3]}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{w - pad - 150}" y="{pad + 16 * i}" fill="{colours[i % 3]}">{name}</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


def pairing_free_floor(pairs_dir: Path, run) -> dict[str, float]:
    """Training loss of the best noise-ignoring predictors: the global and the per-class pixel median (L1)
    or mean (L2), weighted as TorchDEQ's 'exp' fixed-point correction weights the unrolled states."""
    p, m = load_pairs(pairs_dir), run.method
    n = m.grad_steps if m.fp_correction else 1
    weight = sum(0.8 ** (n - 1 - i) for i in range(n))
    centre = (lambda x: x.median(0).values) if m.loss == "l1" else (lambda x: x.mean(0))
    err = (lambda a: a.abs().mean()) if m.loss == "l1" else (lambda a: a.pow(2).mean())
    by_class = torch.stack([centre(p.target[p.labels == c]) for c in range(int(p.labels.max()) + 1)])
    return {"global": weight * err(p.target - centre(p.target)).item(),
            "per class": weight * err(p.target - by_class[p.labels]).item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, type=Path, help="pair directory from `isynth pairs`")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("overrides", nargs="*", help="section.field=value for both runs")
    args = ap.parse_args()
    base = [f"method.pairs={args.pairs.resolve()}", f"train.max_steps={args.steps}", "train.train_flops=none",
            *args.overrides]
    curves = {}
    for name, shuffle in (("true pairs", False), ("shuffled pairs", True)):
        run = make_run("get", args.preset, [*base, f"method.shuffle_pairs={str(shuffle).lower()}"])
        run_dir = train(run, args.out / ("shuffled" if shuffle else "true"), progress=False)
        curves[name] = losses(run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    svg(curves, args.out / "loss.svg")
    print("| pairs | loss at first log | final loss | final / first |\n|---|---|---|---|")
    for name, c in curves.items():
        (s0, l0), (s1, l1) = c[0], c[-1]
        print(f"| {name} | {l0:.4f} (step {s0}) | {l1:.4f} (step {s1}) | {l1 / l0:.3f} |")
    floor = pairing_free_floor(args.pairs, run)
    print(f"\nfloor of a predictor that ignores the noise: {floor['global']:.4f} (one image for all), "
          f"{floor['per class']:.4f} (one per class)")
    print(f"curves: {args.out / 'loss.svg'}")


if __name__ == "__main__":
    main()
