"""How close training's memory estimate (`isynth.memory`: 5 copies of the weights plus the activations saved
for the backward pass, measured at two small batches and extended) comes to the memory one training step
really takes, per paradigm, and what the estimate costs.

Each (paradigm, batch) runs in a fresh process: the growth of its peak resident memory over one optimizer
step, from a state where the data and model are loaded, is the measured figure (CPU; on CUDA the same
script reads torch.cuda.max_memory_allocated).

    python benchmarks/memory_estimate.py --batches 64,512
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from isynth.hardware import default_device
from isynth.memory import TRAINING_COPIES, human, saved_bytes, state_bytes
from isynth.paradigms import PARADIGMS
from isynth.presets import make_run
from isynth.trainer import build, build_optimizer, train_step


def one(paradigm: str, preset: str, batch: int) -> dict:
    torch.set_num_threads(1)
    device = default_device()
    s = build(make_run(paradigm, preset, ["train.max_steps=1", f"train.batch_size={batch}"]), device)
    tokens, labels = (t.to(device) for t in s.model.training_data(s.dataset))
    idx = torch.randint(0, len(labels), (batch,), device=device)
    x, y = tokens[idx], labels[idx]
    opt = build_optimizer(s.model, s.run.train, device)
    t0 = time.perf_counter()
    estimate = state_bytes(s.model, TRAINING_COPIES) + saved_bytes(s.model, tokens, labels, nullcontext(), batch)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t1 = time.perf_counter()
    train_step(s.model, s.model, opt, x, y, 1e-3, 1.0, nullcontext())
    step_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The step allocates gradients and AdamW's moments; the weights (and EMA, held by the trainer) exist before.
    return {"paradigm": paradigm, "batch": batch, "estimate": estimate, "measured": peak - base
            + state_bytes(s.model, 2), "estimate_s": seconds, "step_s": step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--batches", default="64,512")
    p.add_argument("--paradigms", default=",".join(x for x in PARADIGMS if x != "get"))
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]))))
        return
    print(f"| paradigm ({a.preset}) | batch | estimate | measured | estimate / measured | estimate time "
          "| one step |")
    print("|---|---|---|---|---|---|---|")
    for paradigm in a.paradigms.split(","):
        for batch in map(int, a.batches.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", paradigm, a.preset, str(batch)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(f"| {paradigm} | {batch} | {human(r['estimate'])} | {human(r['measured'])} | "
                  f"{r['estimate'] / r['measured']:.2f} | {r['estimate_s'] * 1e3:.0f} ms | "
                  f"{r['step_s'] * 1e3:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
