"""What the reliability guarantees cost: the divergence guard's per-step device work and the writer lock,
each against the time of one training step of the `cpu` preset (the main job's size).

    python benchmarks/guard_cost.py [--paradigm ar] [--steps 60]

The guard adds, per step, two finiteness tests on scalars and a few scalar updates (no host sync; the host
reads them at log steps, which synchronise anyway); the lock is one flock per command. Both are timed
directly here (median of many repetitions) and compared with the median step time of the same process.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from isynth.files import writer_lock
from isynth.presets import make_run
from isynth.trainer import build, build_optimizer, train_step


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paradigm", default="ar")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    s = build(make_run(args.paradigm, "cpu"), torch.device("cpu"))
    model, cfg = s.model.train(), s.run.train
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    tokens, labels = s.model.training_data(s.dataset)
    batches = [torch.randint(0, len(labels), (cfg.batch_size,)) for _ in range(args.steps)]
    it = iter(range(10**9))

    def step():
        idx = batches[next(it) % len(batches)]
        return train_step(model, model, opt, tokens[idx], labels[idx], cfg.lr, cfg.grad_clip, nullcontext())

    for _ in range(5):  # warm-up
        step()
    step_s = _median_s(step, args.steps)
    loss, norm, bad = step()
    acc = [torch.zeros(()) for _ in range(3)]
    count, first = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)

    def guard():  # the loop's per-step additions (isynth/trainer.py), with train_step's two isfinite tests
        b = ~(torch.isfinite(norm) & torch.isfinite(loss))
        acc[0].add_(torch.where(b, 0.0, loss))
        acc[1].add_(torch.where(b, 0.0, norm))
        acc[2].add_((~b).float())
        first.copy_(torch.where((count == 0) & b, 7, first))
        count.add_(b.long())

    guard_s = _median_s(guard, 2000)
    with tempfile.TemporaryDirectory() as d:
        def lock():
            with writer_lock(Path(d) / "run"):
                pass
        lock_s = _median_s(lock, 500)
    print(f"{args.paradigm}, cpu preset, {torch.get_num_threads()} threads: step {step_s * 1e3:.2f} ms; "
          f"divergence guard {guard_s * 1e6:.1f} us per step = {100 * guard_s / step_s:.3f}% of a step; "
          f"writer lock {lock_s * 1e6:.1f} us per command = {100 * lock_s / step_s:.3f}% of one step")


if __name__ == "__main__":
    main()
