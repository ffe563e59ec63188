"""Throughput of the FID Inception-v3 feature network (`isynth fid`, `eval --metrics inception`): images/s,
FLOPs per image (counted by `torch.utils.flop_counter`) and the share of the fp32 matmul peak it reaches.

    python benchmarks/inception_throughput.py [--side 32] [--batch 64] [--repeats 3]

The network is randomly initialised (the cost does not depend on the weights, and the standard weights file is
not downloaded); the images are random uint8 of `--side` pixels, resized to 299 x 299 inside the network as
every FID implementation does, so the cost per image is the same for any input size. It tells how long the
standard 50,000-sample protocol takes to featurise on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from isynth.eval.inception import FIDInceptionV3, inception_features
from isynth.hardware import default_device, peak_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    device = default_device()
    net = FIDInceptionV3().to(device).eval().requires_grad_(False)
    images = np.random.default_rng(0).integers(0, 256, (a.batch, a.side, a.side, 3), dtype=np.uint8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.from_numpy(images[:1]).to(device))
    flops = counter.get_total_flops()
    inception_features(net, images, a.batch)  # warm-up
    best = float("inf")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        inception_features(net, images, a.batch)  # ends on a .cpu() copy: synchronised
        best = min(best, time.perf_counter() - t0)
    peak, how = peak_flops(device)
    rate = a.batch / best
    print(json.dumps({"device": str(device), "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "cores": os.cpu_count(), "batch": a.batch,
                      "gflops_per_image": round(flops / 1e9, 3), "images_per_s": round(rate, 2),
                      "achieved_gflop_s": round(flops * rate / 1e9, 1), "peak_gflop_s": round(peak / 1e9, 1),
                      "peak_source": how, "share_of_peak": round(flops * rate / peak, 3),
                      "minutes_per_50k": round(50_000 / rate / 60, 1)}))


if __name__ == "__main__":
    main()
