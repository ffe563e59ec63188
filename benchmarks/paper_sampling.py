"""Sampling images/s of a paradigm at a paper-size preset on its paper's token grid (random weights: the
compute, and so the speed, does not depend on them).

    python benchmarks/paper_sampling.py mar --preset mar-b --batch 256 [--seq-len 256 --token-dim 16]
    python benchmarks/paper_sampling.py rar --preset rar-b --batch 128 --vocab-size 1024

Anchor: MAR-B, 256 tokens (KL-16 at 256 px), batch 256, 64 steps, DDPM 100 head steps, CFG: 0.8 img/s on
an A100 (MAR paper; LTH14/mar#45: 0.3 s/img at batch 256 for MAR-H/L). Runs in bf16 autocast on CUDA,
fp32 on CPU. Prints one JSON line: images/s, seconds per batch, FLOPs per image and achieved FLOP/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from isynth.conditions import Conditions
from isynth.hardware import default_device
from isynth.paradigms import build_paradigm
from isynth.presets import make_run
from isynth.tokenizers.fixed import ShapeOnly
from isynth.trainer import autocast_for


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paradigm")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--token-dim", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="section.field=value, e.g. sample.num_steps=16")
    args = ap.parse_intermixed_args()
    run = make_run(args.paradigm, args.preset, args.overrides)
    discrete = run.tokenizer.kind == "grey"
    tok = ShapeOnly(args.seq_len, args.vocab_size if discrete else 0, 1 if discrete else args.token_dim, discrete)
    device = default_device()
    torch.manual_seed(0)
    model = build_paradigm(run, tok, Conditions.classes(args.num_classes)).to(device).eval()
    s = dataclasses.replace(run.sample, batch_size=args.batch)
    labels = torch.arange(args.batch, device=device) % args.num_classes
    with autocast_for(device):  # warm-up: kernels, allocator, scheduler caches
        model.sample(labels[:8], s, torch.Generator(device=device).manual_seed(1))
    best = float("inf")
    for _ in range(args.repeats):
        gen = torch.Generator(device=device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_for(device):
            model.sample(labels, s, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    flops = model.sample_flops(s)
    print(json.dumps({
        "paradigm": args.paradigm, "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
        "params": model.num_params(), "sampling": dataclasses.asdict(s), "seconds_per_batch": round(best, 3),
        "images_per_s": round(args.batch / best, 3), "sample_flops_per_image": flops,
        "achieved_tflops": round(flops * args.batch / best / 1e12, 2),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__}))


if __name__ == "__main__":
    main()
