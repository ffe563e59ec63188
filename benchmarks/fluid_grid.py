"""Fluid's question at laptop scale: discrete against continuous tokens of the same grid, raster against random
order, at equal training FLOPs on `shapes`, with prompt following on seen and held-out combinations.

    python benchmarks/fluid_grid.py --out runs/fluid-grid [--flops 6e12] [--seeds 0 1 2] [--cells ar mar-discrete]

Trains one discrete tokenizer (FSQ, Mentzer et al. 2023) and one continuous (KL-VAE, Rombach et al. 2022) on
shapes at the `cpu` tokenizer preset, both 32x32 -> 8x8, then the four cells of Fluid's grid (Fan et al.
2024) at one budget per seed: `ar` and `mar` on the FSQ codes, `ar-cont` and `mar` on the KL latents (2x2
latent cells per token, the main job's continuous grid), so that the random-order cells differ only in the
token head, plus `maskgit` on the FSQ codes as a reference (confidence order); evaluates each with `isynth
eval` (FD in the attribute network's space, all-attributes accuracy on every class and on the held-out
combinations). Prints a markdown table of the mean and the spread (min-max) over seeds; every run directory
stays under --out, and finished runs and tokenizers are reused on a re-run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# cell -> (paradigm, tokenizer): Fluid's 2x2 grid, then MaskGIT beside it
CELLS = {"ar": ("ar", "fsq"), "mar-discrete": ("mar", "fsq"), "ar-cont": ("ar-cont", "kl"), "mar": ("mar", "kl"),
         "maskgit": ("maskgit", "fsq")}
KEYS = ("fd_shapes", "class_accuracy", "heldout_class_accuracy")


def isynth(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "isynth", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"isynth {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--flops", type=float, default=6e12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-samples", type=int, default=1080, help="2 per class of shapes' 540")
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    args = ap.parse_args()
    for kind in sorted({CELLS[c][1] for c in args.cells}):
        isynth("tokenizer", "train", kind, "--dataset", "shapes", "--preset", "cpu", "--quiet",
               "--out", args.out / f"tokenizer-{kind}")
    results: dict[str, list[dict]] = {}
    for cell in args.cells:
        paradigm, kind = CELLS[cell]
        for seed in args.seeds:
            run = args.out / f"{cell}-seed{seed}"
            extra = ["tokenizer.patch_size=2"] if kind == "kl" else []
            isynth("train", paradigm, "--dataset", "shapes", "--out", run, "--flops", args.flops, "--quiet",
                   f"tokenizer.path={args.out / f'tokenizer-{kind}'}", f"train.seed={seed}", *extra)
            metrics = json.loads(isynth("eval", run, "--num-samples", args.num_samples))
            results.setdefault(cell, []).append(metrics)
            print(f"{cell} seed {seed}: " + ", ".join(f"{k} {metrics.get(k)}" for k in KEYS), file=sys.stderr)
    print(f"| cell | paradigm | tokens | {' | '.join(KEYS)} | steps |\n|---|---|---|" + "---|" * (len(KEYS) + 1))
    for cell, rows in results.items():
        cells = []
        for key in KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})" if vals else "—")
        print(f"| {cell} | {' | '.join(CELLS[cell])} | {' | '.join(cells)} | {rows[0]['step']} |")
    print(f"\nseeds {args.seeds}; {args.flops:.2g} training FLOPs per run; {args.num_samples} samples per evaluation")


if __name__ == "__main__":
    main()
