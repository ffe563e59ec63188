"""isynth against the authors' code, side by side in one process on one device, same sizes, same batches.

    python benchmarks/vs_reference.py --rar-repo PATH/1d-tokenizer --mar-repo PATH/mar [--only rar|mar]

PATH/1d-tokenizer is a checkout of bytedance/1d-tokenizer (its `modeling/rar.py` is imported) and PATH/mar
one of LTH14/mar (`models/mar.py`, which needs timm). Nothing of theirs is copied into isynth: the script
puts each checkout on sys.path and builds both models with random weights (the compute, and so the speed,
does not depend on them): RAR-B (768 wide, 24 blocks, 1024 codes, 1000 classes, 256 tokens) and MAR-B
(768 wide, 12 + 12 blocks, 16-dim KL-16 tokens on a 16 x 16 grid, diffusion head 6 x 1024).

Measured, each as the median of timed repeats after a warm-up (CUDA synchronised around each):
- sampling images/s at the papers' settings: RAR 256 steps, KV cache, CFG 16 with pow-cosine 2.75, batch
  128; MAR 64 steps, linear CFG 2.9, 100 DDPM head steps, batch 256. The first batch at the size is timed
  apart from the steady ones.
- training samples/s of a whole optimizer step (bf16 autocast forward, backward, clipping, fused AdamW for
  both, so the model code is what differs), batch 64.
isynth runs as its sampler and trainer do: bf16 sampling weights with CUDA graphs, compiled training on
CUDA (`train.compile=auto`). On a CPU everything is fp32. Prints one JSON line per measurement and a table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from isynth.conditions import Conditions
from isynth.graphs import capturing
from isynth.hardware import autocast_for, default_device, peak_flops
from isynth.paradigms import build_paradigm
from isynth.presets import make_run
from isynth.runs import sampling_precision
from isynth.tokenizers.fixed import ShapeOnly
from isynth.trainer import build_optimizer, prepare_training, train_step

SEQ, CODES, CLASSES, TOKEN_DIM = 256, 1024, 1000, 16


class Attrs(dict):
    """The attribute-style config (OmegaConf-like) the RAR reference reads."""

    def __getattr__(self, name):
        return self[name]


def _import(repo: str | None, flag: str, module: str):
    if not repo:
        return None
    root = Path(repo)
    if not (root / (module.replace(".", "/") + ".py")).exists():
        sys.exit(f"error: {flag} {repo}: no {module.replace('.', '/')}.py there (want a checkout of the authors' repo)")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    except ImportError as e:
        sys.exit(f"error: importing {module} from {repo} failed: {e} (install what it needs, e.g. timm, einops)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def isynth_model(paradigm: str, preset: str, device, discrete: bool):
    run = make_run(paradigm, preset)
    tok = ShapeOnly(SEQ, CODES if discrete else 0, 1 if discrete else TOKEN_DIM, discrete)
    torch.manual_seed(0)
    return build_paradigm(run, tok, Conditions.classes(CLASSES)).to(device)


def reference_step(model, opt, loss_fn, amp) -> None:
    """One optimizer step of the authors' model as isynth's trainer does it: autocast forward, backward,
    clipping at 1, the optimizer."""
    with amp:
        loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_rate(step, device, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):  # compilation, autotuning, allocator
        step()
    return batch * steps / sum(timed(step, device, steps))


def report(rows: list[dict], name: str, **fields):
    row = {"workload": name, **fields}
    rows.append(row)
    print(json.dumps(row), flush=True)


def sample_rates(fn_first, fn, device, batch: int, repeats: int) -> dict:
    first = timed(fn_first, device, 1)[0]
    steady = statistics.median(timed(fn, device, repeats))
    return {"first_batch_s": round(first, 3), "steady_batch_s": round(steady, 3),
            "images_per_s": round(batch / steady, 2), "first_over_steady": round(first / steady, 2)}


def compare_sampling(rows, name: str, ref_sample, ours, labels, device, repeats: int) -> None:
    """Official sampler (warmed up by the caller) against isynth's as `isynth sample` runs it: bf16 sampling
    weights and CUDA graphs, warmed up at batch 8, then the first batch at the size and the steady ones."""
    b = len(labels)
    r_ref = sample_rates(ref_sample, ref_sample, device, b, repeats)
    s = ours.run.sample
    with sampling_precision(ours), capturing(True):
        def our_sample(n=b):
            ours.sample(labels[:n], s, torch.Generator(device=device).manual_seed(0))
        our_sample(8)
        r_ours = sample_rates(our_sample, our_sample, device, b, repeats)
    report(rows, name, official=r_ref, isynth=r_ours, ratio=round(r_ours["images_per_s"] / r_ref["images_per_s"], 2))


def bench_rar(mod, device, args, rows):
    cfg = Attrs(model=Attrs(generator=Attrs(hidden_size=768, num_hidden_layers=24, num_attention_heads=16,
                                            intermediate_size=3072, image_seq_len=SEQ, condition_num_classes=CLASSES,
                                            dropout=0.1, attn_drop=0.1, use_checkpoint=False),
                            vq_model=Attrs(codebook_size=CODES)))
    torch.manual_seed(0)
    ref = mod.RAR(cfg).to(device)
    ours = isynth_model("rar", "rar-b", device, discrete=True)
    amp = autocast_for(device)
    report(rows, "RAR-B parameters", official=sum(p.numel() for p in ref.parameters()), isynth=ours.num_params())

    b = args.rar_batch
    labels = torch.arange(b, device=device) % CLASSES
    ref.eval()
    ours.eval()

    def ref_sample(n=b):
        with amp:
            ref.generate(labels[:n], guidance_scale=16.0, randomize_temperature=1.0, guidance_scale_pow=2.75)

    ref_sample(8)  # process warm-up (kernels, handles) at another size
    compare_sampling(rows, f"RAR-B sampling, batch {b}, 256 steps, CFG 16", ref_sample, ours, labels, device,
                     args.repeats)

    if args.skip == "training":
        return
    # training: a whole optimizer step at batch 64
    ours = isynth_model("rar", "rar-b", device, discrete=True).train()
    ours.set_progress(0, 1)
    prepare_training(ours, ours.run.train, device)
    ref.train()
    tb = args.train_batch
    ids = torch.randint(0, CODES, (tb, SEQ), device=device)
    lab = torch.randint(0, CLASSES, (tb,), device=device)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)

    def ref_loss():
        logits, target = ref(ids, lab, return_labels=True)
        logits = logits[:, :-1]  # the reference's ARLoss: the last position predicts nothing
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

    def ref_step():
        reference_step(ref, opt_ref, ref_loss, amp)

    opt = build_optimizer(ours, ours.run.train, device)
    rate_ref = train_rate(ref_step, device, tb, args.train_steps, 3)
    rate = train_rate(lambda: train_step(ours, ours, opt, ids, lab, 1e-4, 1.0, amp), device, tb, args.train_steps, 3)
    report(rows, f"RAR-B training, batch {tb}", official_samples_per_s=round(rate_ref, 1),
           isynth_samples_per_s=round(rate, 1), ratio=round(rate / rate_ref, 2),
           isynth_mfu=mfu(ours, rate, device))


def mfu(model, samples_per_s: float, device) -> float | None:
    peak, _ = peak_flops(device)
    return round(model.train_flops_per_sample() * samples_per_s / peak, 4)


def bench_mar(mod, device, args, rows):
    torch.manual_seed(0)
    ref = mod.mar_base(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=TOKEN_DIM, mask_ratio_min=0.7,
                       label_drop_prob=0.1, class_num=CLASSES, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                       diffloss_d=6, diffloss_w=1024, num_sampling_steps="100", diffusion_batch_mul=4).to(device)
    ours = isynth_model("mar", "mar-b", device, discrete=False)
    amp = autocast_for(device)
    report(rows, "MAR-B parameters", official=sum(p.numel() for p in ref.parameters()), isynth=ours.num_params())

    # training first (sampling casts isynth's backbone to bf16)
    if args.skip != "training":
        mar_training(ref, ours, device, args, rows, amp)
    if args.skip == "sampling":
        return
    b = args.mar_batch
    labels = torch.arange(b, device=device) % CLASSES
    ref.eval()
    ours = isynth_model("mar", "mar-b", device, discrete=False).eval()

    def ref_sample(n=b, steps=64):
        with amp:
            ref.sample_tokens(n, num_iter=steps, cfg=2.9, cfg_schedule="linear", labels=labels[:n], temperature=1.0)

    ref_sample(8, 4)
    compare_sampling(rows, f"MAR-B sampling, batch {b}, 64 steps, CFG 2.9, 100 DDPM head steps", ref_sample, ours,
                     labels, device, args.mar_repeats)


def mar_training(ref, ours, device, args, rows, amp):
    tb = args.train_batch
    ours.train()
    ours.set_progress(0, 1)
    prepare_training(ours, ours.run.train, device)
    x = torch.randn(tb, TOKEN_DIM, 16, 16, device=device)  # KL-16 latents (B, 16, 16, 16)
    tokens = x.flatten(2).transpose(1, 2).contiguous()  # (B, 256, 16), isynth's token layout
    lab = torch.randint(0, CLASSES, (tb,), device=device)
    ref.train()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)

    def ref_step():
        reference_step(ref, opt_ref, lambda: ref(x, lab), amp)

    opt = build_optimizer(ours, ours.run.train, device)
    rate_ref = train_rate(ref_step, device, tb, args.train_steps, 3)
    rate = train_rate(lambda: train_step(ours, ours, opt, tokens, lab, 1e-4, 1.0, amp), device, tb,
                      args.train_steps, 3)
    report(rows, f"MAR-B training, batch {tb}", official_samples_per_s=round(rate_ref, 1),
           isynth_samples_per_s=round(rate, 1), ratio=round(rate / rate_ref, 2), isynth_mfu=mfu(ours, rate, device))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rar-repo", help="checkout of bytedance/1d-tokenizer")
    ap.add_argument("--mar-repo", help="checkout of LTH14/mar")
    ap.add_argument("--only", choices=["rar", "mar"])
    ap.add_argument("--skip", choices=["sampling", "training"], help="time only the other one")
    ap.add_argument("--rar-batch", type=int, default=128)
    ap.add_argument("--mar-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mar-repeats", type=int, default=1)
    args = ap.parse_args()
    if not args.rar_repo and not args.mar_repo:
        sys.exit("error: give --rar-repo PATH (bytedance/1d-tokenizer) and/or --mar-repo PATH (LTH14/mar)")
    rar = _import(args.rar_repo, "--rar-repo", "modeling.rar") if args.only in (None, "rar") else None
    mar = _import(args.mar_repo, "--mar-repo", "models.mar") if args.only in (None, "mar") else None
    device = default_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    rows: list[dict] = []
    if rar is not None:
        bench_rar(rar, device, args, rows)
    if mar is not None:
        bench_mar(mar, device, args, rows)


if __name__ == "__main__":
    main()
