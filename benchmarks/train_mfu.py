"""Training MFU and sampling throughput of a preset, with the trainer's own optimizer step.

    python benchmarks/train_mfu.py                                  # main-job preset on digits-sized data
    python benchmarks/train_mfu.py --paradigm rar --preset rar-b --seq-len 256 --vocab-size 1024 \
        --num-classes 1000 --batch 64 --sample-batch 128            # RAR-B on a GPU (bf16 autocast)

MFU = analytic training FLOPs per sample x samples/s / peak (measured fp32 matmul on CPU, datasheet dense
bf16 on known GPUs). Tokens are random: throughput does not depend on the data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from isynth.conditions import Conditions
from isynth.data import load_dataset
from isynth.hardware import autocast_for, default_device, peak_flops
from isynth.overrides import apply
from isynth.paradigms import build_paradigm
from isynth.presets import make_run
from isynth.tokenizers.build import build_tokenizer
from isynth.tokenizers.fixed import ShapeOnly
from isynth.trainer import build_optimizer, prepare_training, train_step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paradigm", default="ar")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--token-dim", type=int, default=16, help="continuous tokens' width (MAR's KL-16: 16)")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's train.batch_size")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-batch", type=int, default=0, help="also time sampling at this batch (KV cache + CFG)")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 steps (torch.profiler)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    device = default_device()
    run = make_run(args.paradigm, args.preset, args.overrides)
    discrete = run.tokenizer.kind == "grey"
    if args.seq_len:
        tokenizer = ShapeOnly(args.seq_len, args.vocab_size if discrete else 0, 1 if discrete else args.token_dim,
                              discrete)
        classes = Conditions.classes(args.num_classes)
    else:
        ds = load_dataset(run.data)
        tokenizer, classes = build_tokenizer(run.tokenizer, ds.image_shape), ds.conditions
    torch.manual_seed(0)
    model = build_paradigm(run, tokenizer, classes).to(device).train()
    model.set_progress(0, 1)
    prepare_training(model, run.train, device)  # train.compile (auto: on CUDA), checkpoint_activations
    batch = args.batch or run.train.batch_size
    opt = build_optimizer(model, run.train, device)
    amp = autocast_for(device)
    tokens = torch.randint(0, tokenizer.vocab_size, (batch, tokenizer.seq_len), device=device) if discrete else \
        torch.randn(batch, tokenizer.seq_len, tokenizer.token_dim, device=device)
    labels = torch.randint(0, classes.num_classes, (batch,), device=device)
    cfg = run.train

    def step():
        train_step(model, model, opt, tokens, labels, cfg.lr, cfg.grad_clip, amp, accum=cfg.grad_accum)

    for _ in range(args.warmup):  # with train.compile: compilation happens here
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    if args.profile:
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step()
            sync(device)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25), file=sys.stderr)
    peak, how = peak_flops(device)
    fps = model.train_flops_per_sample()
    achieved = fps * batch * args.steps / seconds
    out = {"paradigm": args.paradigm, "preset": args.preset, "params": model.num_params(), "seq_len": tokenizer.seq_len,
           "batch": batch, "steps_per_s": round(args.steps / seconds, 3),
           "samples_per_s": round(batch * args.steps / seconds, 1), "train_flops_per_sample": fps,
           "achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "peak_source": how,
           "mfu": round(achieved / peak, 4), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}
    out["compile"] = run.train.compile
    if args.sample_batch:
        model = model.eval()
        s = apply(run.sample, {"kv_cache": True, "guidance.scale": max(run.sample.guidance.scale, 1.5)}, "sample.")
        lab = torch.arange(args.sample_batch, device=device) % classes.num_classes
        with amp:
            model.sample(lab[:2], s, None)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            model.sample(lab, s, torch.Generator(device=device).manual_seed(0))
            sync(device)
        dt = time.perf_counter() - t0
        out.update(sample_batch=args.sample_batch, sample_images_per_s=round(args.sample_batch / dt, 2),
                   sampling=dataclasses.asdict(s), sample_flops_per_image=model.sample_flops(s))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
