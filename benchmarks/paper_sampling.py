"""Sampling images/s of a paradigm at a paper-size preset on its paper's token grid (random weights: the
compute, and so the speed, does not depend on them).

    python benchmarks/paper_sampling.py mar --preset mar-b --batch 256 [--seq-len 256 --token-dim 16]
    python benchmarks/paper_sampling.py rar --preset rar-b --batch 128 --vocab-size 1024

Anchor: MAR-B, 256 tokens (KL-16 at 256 px), batch 256, 64 steps, DDPM 100 head steps, CFG: 0.8 img/s on
an A100 (MAR paper; LTH14/mar#45: 0.3 s/img at batch 256 for MAR-H/L). Runs as `isynth sample` does: on
CUDA bf16 backbone weights under bf16 autocast with each step replayed from a CUDA graph
(`sample.cuda_graphs=false` to compare), fp32 on CPU. Prints one JSON line: the first batch at the size
(graphs captured) and the median steady batch, images/s, FLOPs per image, achieved FLOP/s, and on CUDA the
roofline (FLOPs and bytes per image and the images/s they bound).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch

from isynth.backbone import decode_keys
from isynth.conditions import Conditions
from isynth.graphs import capturing
from isynth.hardware import default_device, peak_flops
from isynth.paradigms import build_paradigm
from isynth.presets import make_run
from isynth.runs import sampling_precision
from isynth.tokenizers.fixed import ShapeOnly


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paradigm")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--token-dim", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="steady batches timed (median)")
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

    def once(n: int) -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        model.sample(labels[:n], s, gen)
        sync(device)
        return time.perf_counter() - t0

    with sampling_precision(model), capturing(s.cuda_graphs):
        once(8)  # process warm-up at another size: kernels, cuBLAS handles, scheduler caches
        first = once(args.batch)  # the first batch at this size: captures its CUDA graphs
        steady = statistics.median(once(args.batch) for _ in range(args.repeats))
    flops = model.sample_flops(s)
    out = {"paradigm": args.paradigm, "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
           "params": model.num_params(), "sampling": dataclasses.asdict(s), "first_batch_s": round(first, 3),
           "steady_batch_s": round(steady, 3), "first_over_steady": round(first / steady, 2),
           "images_per_s": round(args.batch / steady, 3), "sample_flops_per_image": flops,
           "achieved_tflops": round(flops * args.batch / steady / 1e12, 2),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__}
    if device.type == "cuda":
        out.update(roofline(model, s, args.batch, flops, device))
    print(json.dumps(out))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, gib: float = 1.0) -> float:
    """Measured device memory bandwidth, bytes/s: a large device-to-device copy, bytes read + written."""
    a = torch.empty(int(gib * 2**30) // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * 4 * 10 / (time.perf_counter() - t0)


def roofline(model, s, batch: int, flops: int, device) -> dict:
    """FLOPs and the fewest bytes per image, and the images/s bound they imply. Bytes: the bf16 weights
    of every network evaluation (shared by the batch), and for next-token prediction the KV cache each
    step reads (both CFG halves, each step's key bucket). Activations are not counted: a lower bound."""
    weight_bytes = 2 * model.num_params()
    evals = model.num_network_evals(s)
    total = weight_bytes * evals / batch
    if hasattr(model, "prefix") and getattr(s, "kv_cache", False):  # ar / rar: the cache reads
        cfg, k, n = model.run.model, model.prefix, model.seq_len
        rows = 2 if s.guidance.on else 1
        length = k + n - 1
        keys = sum(decode_keys(k - 1 + i, length) for i in range(1, n))
        total += rows * 2 * cfg.depth * cfg.width * keys * 2  # k and v, bf16
    peak, _ = peak_flops(device)
    bw = copy_bandwidth(device)
    t_flops, t_bytes = flops / peak, total / bw
    return {"bytes_per_image_lower_bound": int(total), "peak_flops_per_s": peak, "bandwidth_bytes_per_s": round(bw),
            "bound": "memory" if t_bytes > t_flops else "compute",
            "bound_images_per_s": round(1 / max(t_flops, t_bytes), 1)}


if __name__ == "__main__":
    main()
