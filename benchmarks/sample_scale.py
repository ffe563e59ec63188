"""`isynth sample` at scale: peak memory against the number of samples, in shards and all at once, and
images/s, for one process and for two under torchrun (gloo, CPU).

Trains a tiny flow-matching model on `shapes` (32x32 RGB, so held images are 3 KB each) once, then samples
N images with `--shard-size` S; the peak resident memory of each command is read by GNU time.

    python benchmarks/sample_scale.py --counts 5000,50000 --shard-size 1000
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = "2"  # Euler steps per sample: the point is the sampler's memory and I/O, not image quality


def _run(cmd: list[str], env: dict) -> tuple[dict, float]:
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    kb = max(int(x) for x in re.findall(r"maxrss_kb=(\d+)", done.stderr))
    return json.loads(done.stdout.splitlines()[-1]), kb * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="5000,50000")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="isynth-sample-scale-"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    isynth = [sys.executable, "-m", "isynth"]
    run = work / "run"
    if not (run / "checkpoint.safetensors").exists():
        subprocess.run([*isynth, "train", "diffusion", "--preset", "tiny", "--dataset", "shapes", "--steps", "20",
                        "--out", str(run), "--quiet", "data.num_images=1000", "tokenizer.patch_size=2"],
                       env=env, check=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    print("| samples | shard size | processes | peak memory (max over processes) | images/s |")
    print("|---|---|---|---|---|")
    for n in map(int, a.counts.split(",")):
        for shard, procs in ((a.shard_size, 1), (n, 1), (a.shard_size, 2)):
            out = work / f"s-{n}-{shard}-{procs}.npz"
            args = ["sample", str(run), "--num-samples", str(n), "--shard-size", str(shard), "--quiet",
                    "--out", str(out), f"sample.num_steps={STEPS}", "sample.batch_size=250"]
            cmd = [*isynth, *args] if procs == 1 else [str(torchrun), "--nproc_per_node", str(procs), "-m",
                                                      "isynth", *args]
            info, rss = _run(cmd, env)
            print(f"| {n} | {shard} | {procs} | {rss / 1e6:.0f} MB | {info['images_per_s']} |", flush=True)
            out.unlink()
    print(f"\nwork directory {work}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
