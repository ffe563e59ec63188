"""Sampling throughput with and without the KV cache (issue 2): 64 tokens, batch 256, same seed.

    python benchmarks/kv_cache.py [--run runs/compare/ar] [--batch 256] [--cfg-scale 2]

Uses a trained run's EMA weights when --run is given, else the `cpu` preset at random init (throughput
does not depend on the weights; sample identity is checked either way). Prints a JSON line per setting.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from isynth.hardware import default_device
from isynth.overrides import apply
from isynth.presets import make_run
from isynth.runs import load_trained
from isynth.trainer import build


def timed_sample(model, labels, sampling, seed, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        gen = torch.Generator(device=model.device).manual_seed(seed)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.sample(labels, sampling, gen)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="trained run directory (default: cpu preset, random init)")
    ap.add_argument("--paradigm", default="ar")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cfg-scale", type=float, nargs="*", default=[1.0, 2.0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = default_device()
    if args.run:
        model, _, _ = load_trained(args.run, device=device)
    else:
        torch.manual_seed(0)
        model = build(make_run(args.paradigm, "cpu"), device).model.eval()
    labels = torch.arange(args.batch, device=device) % model.num_classes
    for g in args.cfg_scale:
        rows = {}
        for kv in (True, False):
            s = apply(model.run.sample, {"kv_cache": kv, "guidance.scale": g}, "sample.")
            tokens, seconds = timed_sample(model, labels, s, seed=0, repeats=args.repeats)
            rows[kv] = (tokens, seconds, model.sample_flops(s))
        (t_kv, s_kv, f_kv), (t_no, s_no, f_no) = rows[True], rows[False]
        print(json.dumps({
            "paradigm": model.run.paradigm, "seq_len": model.seq_len, "batch": args.batch, "cfg_scale": g,
            "images_per_s_kv_cache": round(args.batch / s_kv, 1), "images_per_s_no_cache": round(args.batch / s_no, 1),
            "speedup": round(s_no / s_kv, 2), "identical_samples": bool(torch.equal(t_kv, t_no)),
            "sample_flops_per_image_kv_cache": f_kv, "sample_flops_per_image_no_cache": f_no,
            "device": str(device), "threads": torch.get_num_threads(), "machine": platform.machine(),
        }))


if __name__ == "__main__":
    main()
