"""Encode and decode throughput of trained tokenizers, images/s, with their FLOPs per image and the roofline.

    python benchmarks/tokenizer_throughput.py runs/tok-fsq runs/tok-kl [--batch 512] [--repeats 5]

Loads each `isynth tokenizer train` directory, moves it to the default device (CUDA where there is one, under
bf16 autocast; else the CPU in fp32) and times `encode` and `decode` of a batch of the directory's own image
size (random uint8 images: the cost does not depend on the content), best of `--repeats` after a warm-up.
Prints one JSON line per tokenizer: images/s, FLOPs per image, achieved FLOP/s, and on a GPU the bytes of
weights read per batch beside the device's datasheet peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from isynth.hardware import default_device, peak_flops
from isynth.tokenizers.learned import load_learned
from isynth.tokenizers.store import read_manifest


def _timed(fn, x: torch.Tensor, device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    out = fn(x)  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = default_device()
    peak, peak_how = peak_flops(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for d in args.dirs:
        manifest = read_manifest(d)
        shape = tuple(manifest["image_shape"])
        tok = load_learned(d, shape).to(device)
        images = torch.randint(0, 256, (args.batch, *shape), dtype=torch.uint8, device=device)
        with torch.no_grad(), amp:
            tokens, t_enc = _timed(tok.encode, images, device, args.repeats)
            _, t_dec = _timed(tok.decode, tokens, device, args.repeats)
        params = sum(p.numel() for p in tok.net.parameters()) if hasattr(tok, "net") else None
        cpu = platform.processor() or platform.machine()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
        print(json.dumps({
            "tokenizer": manifest["kind"], "image_shape": list(shape), "grid": manifest.get("grid"),
            "batch": args.batch, "device": name, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "encode_images_per_s": round(args.batch / t_enc, 1), "decode_images_per_s": round(args.batch / t_dec, 1),
            "encode_flops_per_image": tok.encode_flops(), "decode_flops_per_image": tok.decode_flops(),
            "encode_flops_per_s": tok.encode_flops() * args.batch / t_enc,
            "decode_flops_per_s": tok.decode_flops() * args.batch / t_dec,
            "peak_flops_per_s": peak, "peak_source": peak_how, "params": params,
            "weight_bytes_per_batch": params * (2 if device.type == "cuda" else 4) if params else None}))


if __name__ == "__main__":
    main()
