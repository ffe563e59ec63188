"""Quality, cost and speed of one trained run under several sampling settings, as a markdown table.

    python benchmarks/sampling_sweep.py runs/compare/mar \\
        --variant "head.sampler=ddpm head.steps=100" --variant "head.sampler=dpm++ head.steps=10"
    python benchmarks/sampling_sweep.py runs/compare/mdm --variant "guidance.scale=2" \\
        --variant "guidance.scale=2 guidance.t_min=0.2 guidance.t_max=0.6"

    python benchmarks/sampling_sweep.py runs/compare/diffusion --weights both \
        --variant "num_steps=4 sampler=euler" --variant "num_steps=8 sampler=euler"

Each variant overrides the run's sampling config (`field=value`, as `sample.field=value` on the CLI) and is
evaluated like `isynth eval` (EMA weights unless --weights raw|both; the same seed and labels) on a copy
of the run directory, so the run's own metrics and samples are left alone. Columns: FD-digits, class
accuracy, precision/recall, sampling FLOPs/image, backbone passes (NFE) and those with the unconditional
half, and images/s.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from isynth.eval.run_eval import evaluate_run
from isynth.overrides import apply, parse_overrides
from isynth.runs import load_trained


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--variant", action="append", required=True, help='space-separated field=value pairs')
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--weights", choices=["ema", "raw", "both"], default="ema")
    args = ap.parse_args()
    model, _, _ = load_trained(Path(args.run))
    weights = {"ema": [True], "raw": [False], "both": [True, False]}[args.weights]
    print("| sampling | weights | FD-digits | class acc | precision | recall | FLOPs/img | NFE | NFE with uncond "
          "| images/s | ms/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(args.run, copy)
        for text, ema in ((t, e) for t in args.variant for e in weights):
            s = apply(model.run.sample, parse_overrides(text.split()), "sample.")
            r = evaluate_run(copy, args.num_samples, s, use_ema=ema)
            print(f"| {text} | {'EMA' if ema else 'raw'} | {r['fd_digits']:.2f} | {r['class_accuracy']:.3f} | "
                  f"{r['precision']:.3f} | {r['recall']:.3f} | {r['sample_flops_per_image']:.3g} | {r['nfe']} | "
                  f"{model.unconditional_passes(s)} | {r['images_per_s']:.1f} | {1 / r['images_per_s'] * 1e3:.2f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
