"""The one training loop: AdamW, warm-up + cosine, grad clipping, EMA, a step or FLOPs budget, DDP.

Resumption is exact: all randomness of step s (batch choice, label dropout, orders, dropout masks) is
drawn from seeds derived from (seed, step, rank), and the checkpoint holds weights, EMA and optimizer
state, so a run killed at any point and restarted reaches the same weights as an uninterrupted one (CPU).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from isynth.backbone import Transformer
from isynth.checkpoint import (
    CHECKPOINT,
    LOG,
    check_meta,
    check_optimizer,
    check_state,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from isynth.config import RunConfig, TrainConfig
from isynth.data import ImageDataset, load_dataset
from isynth.errors import Diverged, IsynthError
from isynth.figures import loss_curves
from isynth.files import atomic_write_text, writer_lock
from isynth.finetune import load_init, write_init
from isynth.hardware import autocast_for, default_device, init_distributed, peak_flops
from isynth.memory import TRAINING_COPIES, check_training_memory, require, state_bytes
from isynth.paradigms import build_paradigm
from isynth.paradigms.base import Paradigm
from isynth.runs import change_budget, prepare_run_dir
from isynth.tokenizers.build import build_tokenizer
from isynth.tracking import SampleGrids, Tracker, check_sinks


def total_steps_for(train: TrainConfig, flops_per_sample: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    per_step = flops_per_sample * train.batch_size
    steps = int(train.train_flops // per_step)
    if steps < 1:
        raise IsynthError(f"train.train_flops={train.train_flops:.3g} is less than one step "
                          f"({per_step:.3g} FLOPs at batch {train.batch_size})")
    return steps


def lr_at(step: int, total: int, train: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr (RAR Table 6) or constant (MAR, GET).

    A function of the total: a run whose budget is raised (or lowered) continues on the new total's schedule
    from the step it reached, so a cosine run's rate jumps from where the old schedule ended to
    lr_at(step, new total), and the warm-up's length follows the new total. A constant rate without warm-up
    is the same for every total: such a run extended from 20 to 40 steps is the 40-step run, bit for bit."""
    warmup = int(train.warmup_fraction * total)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return train.lr
    progress = (step - warmup) / max(1, total - warmup)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    # The (1 + s) / (10 + s) warm-up keeps early EMA weights from being dominated by the random init.
    return min(decay, (1 + step) / (10 + step))


def step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2**63)


class BatchOrder:
    """Epoch-wise seeded permutations of the training set; batch s is a pure function of (seed, s)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        out = np.empty(self.batch, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._perm_of(int(epoch))[pos[sel] % self.n]
        return out


@dataclass
class Setup:
    """Everything built from a config before anything is written to disk."""

    run: RunConfig
    dataset: ImageDataset
    model: Paradigm
    total_steps: int
    flops_per_sample: int


def build(run: RunConfig, device: torch.device | None = None, check_data: bool = True) -> Setup:
    """Dataset, model and budget of `run`; check_data=False skips the paradigm's own training-data checks
    (compare validates GET before its teacher's pairs exist)."""
    dataset = load_dataset(run.data)
    device = device or default_device()
    with torch.device("cpu"):  # a learned tokenizer loads real weights, also where the model is built on "meta"
        tokenizer = build_tokenizer(run.tokenizer, dataset.image_shape)
    tokenizer = tokenizer.to(device)
    if check_data:
        tokenizer.check_data(dataset.train_images)
    with torch.device("meta"):  # the weights' size, before a model too large for the machine is allocated
        shape_only = build_paradigm(run, tokenizer, dataset.conditions)
    require("the model's training state", state_bytes(shape_only, TRAINING_COPIES), device,
            "lower model.width or model.depth", "weights, gradients, AdamW moments and EMA")
    model = build_paradigm(run, tokenizer, dataset.conditions).to(device)
    if check_data:
        model.validate_training(dataset)
    fps = model.train_flops_per_sample()
    return Setup(run, dataset, model, total_steps_for(run.train, fps), fps)


def build_optimizer(model: Paradigm, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and embeddings (GPT-2 / MAR practice).

    The fused kernel on every device: on CPU the unfused update's result depends on how its elementwise
    loops are split across threads (vector body vs scalar tail round differently), which broke bitwise
    resumption under load; the fused one is also faster."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def train_step(ddp, model: Paradigm, opt, tokens, labels, lr: float, grad_clip: float, amp,
               skip_nonfinite: bool = False, accum: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step (forward under `amp`, backward, clipping, AdamW). Returns the detached loss, the
    gradient norm before clipping and whether either is non-finite, all on the device: no host sync.
    With `accum` > 1 the batch runs as that many micro-batches whose gradients add up (each loss scaled by
    1 / accum; DDP synchronises only the last backward).
    With `skip_nonfinite` a bad batch makes no update: the fused AdamW reads `found_inf` on the device (the
    mechanism of torch.amp.GradScaler) and leaves weights, moments and step count as they were."""
    for g in opt.param_groups:
        g["lr"] = lr
    total = torch.zeros((), device=tokens.device)
    labs = labels.chunk(accum) if labels is not None else [None] * accum  # tokenizers train without labels
    for i, (tok, lab) in enumerate(zip(tokens.chunk(accum), labs)):
        last = i == accum - 1
        with amp, (ddp.no_sync() if not last and ddp is not model else nullcontext()):
            loss = ddp(tok, lab)
        (loss / accum).backward()
        total += loss.detach().float() / accum
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    bad = ~(torch.isfinite(norm) & torch.isfinite(total))  # a NaN loss gives a NaN norm too
    if skip_nonfinite:
        opt.found_inf = bad.float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, norm.detach(), bad


def prepare_training(model: Paradigm, cfg: TrainConfig, device: torch.device) -> None:
    """Compilation (train.compile; auto: on CUDA) and activation checkpointing of every backbone stack."""
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    for m in model.modules():
        if isinstance(m, Transformer):
            m.checkpoint_activations = cfg.checkpoint_activations
            if use_compile:
                m.compile_training()


def _ema_copy(model: Paradigm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(run: RunConfig, out: Path, progress: bool = True, init_from: Path | None = None) -> Path:
    """Train `run` into directory `out`, resuming from its checkpoint if there is one; another budget for an
    existing run extends (or shortens) it (`runs.change_budget`). A new run with `init_from` starts from that
    run's EMA weights (`isynth.finetune`). One process writes a run directory at a time (`writer_lock`); a
    non-finite loss or gradient norm stops training with `Diverged` (or skips the batch, up to
    train.skip_nonfinite times) and is never checkpointed."""
    rank, world = init_distributed()
    device = default_device()
    torch.manual_seed(run.train.seed)  # identical initial weights on every rank and every attempt
    s = build(run, device)
    check_sinks(run.train.log_sinks)  # a missing extra is named before any run directory exists
    if run.train.batch_size % (world * run.train.grad_accum):
        raise IsynthError(f"train.batch_size={run.train.batch_size} is not divisible by {world} processes x "
                          f"train.grad_accum={run.train.grad_accum} micro-batches")
    # The training data before the run directory: unreadable data (e.g. a corrupt pair shard) leaves nothing.
    data = tuple(t.to(device) for t in s.model.training_data(s.dataset))  # (N, T[, D]), (N,)
    check_training_memory(s.model, *data, run.train.batch_size // (world * run.train.grad_accum),
                          autocast_for(device), device)
    out = Path(out)
    fill = None
    if init_from is not None:  # the source is checked and its weights loaded before anything is written
        source = load_init(init_from, run, s.model)
        fill = partial(write_init, model=s.model, optimizer=build_optimizer(s.model, run.train, device),
                       record=source, total_steps=s.total_steps, flops_per_sample=s.flops_per_sample)
    with writer_lock(out) if rank == 0 else nullcontext(), Tracker(run, out, active=rank == 0) as tracker:
        saved = prepare_run_dir(out, run, fill) if rank == 0 else None
        if rank == 0 and init_from is not None:
            print(f"{out}: starts from the EMA weights of {source['run_dir']} at step {source['step']}")
        if world > 1:
            dist.barrier()
        return _train(s, data, out, rank, world, device, progress, saved, tracker)


def _check_finite(bad_count: torch.Tensor, first_bad: torch.Tensor, cfg: TrainConfig, last_ckpt: int) -> None:
    """At a log or checkpoint step (the host syncs there anyway): stop if training has diverged."""
    n = int(bad_count.item())
    if n == 0 or (cfg.skip_nonfinite and n <= cfg.skip_nonfinite):
        return
    kept = f"the checkpoint of step {last_ckpt} is kept" if last_ckpt else "no checkpoint was written"
    if cfg.skip_nonfinite:
        raise Diverged(f"training diverged: {n} batches had a non-finite loss or gradient norm, more than "
                       f"train.skip_nonfinite={cfg.skip_nonfinite} (the first at step {int(first_bad.item())}); "
                       f"{kept}")
    raise Diverged(f"training diverged at step {int(first_bad.item())}: the loss or gradient norm is not finite; "
                   f"{kept} (lower train.lr, or skip such batches with train.skip_nonfinite=N)")


def _train(s: Setup, data: tuple[torch.Tensor, torch.Tensor], out: Path, rank: int, world: int,
           device: torch.device, progress: bool, saved: RunConfig | None, tracker: Tracker) -> Path:
    run, model, cfg, total = s.run, s.model, s.run.train, s.total_steps
    tokens_all, labels_all = data

    opt = build_optimizer(model, cfg, device)
    ema = _ema_copy(model)
    start_step, flops_done, elapsed = 0, 0.0, 0.0
    ckpt = out / CHECKPOINT
    new_budget = saved is not None and saved.train != run.train  # prepare_run_dir allows no other change
    if ckpt.exists():
        weights, ema_w, opt_state, meta = load_checkpoint(ckpt)
        load_weights(model, weights, ckpt)  # another config's checkpoint is named as such first
        check_state(ema, ema_w, ckpt, "EMA")
        check_optimizer(opt, opt_state, ckpt)
        meta = check_meta(meta, None if new_budget else total, ckpt)  # change_budget checks a new budget
        ema = {k: v.to(device) for k, v in ema_w.items()}
        opt.load_state_dict(opt_state)
        start_step, flops_done, elapsed = meta["step"], meta["train_flops"], meta["elapsed_s"]
    if new_budget and rank == 0:  # the checkpoint is read and valid: only now does config.json take the new budget
        note = change_budget(out, run, start_step, total_steps_for(saved.train, s.flops_per_sample), total)
        if note:
            print(note)
    if rank == 0:  # also without a checkpoint: a kill during the first one leaves log lines to drop
        truncate_log(out / LOG, start_step)
    if start_step >= total:
        if rank == 0 and progress:
            print(f"{out}: already trained for {total} steps")
        if rank == 0 and not all((out / f"loss{ext}").is_file() for ext in (".png", ".svg")):
            loss_curves([out], out / "loss")  # a run killed between its last checkpoint and its curves
        return out

    tracker.open(start_step)
    grids = SampleGrids(model, out, cfg.sample_every, start_step) if rank == 0 else None  # before compiling
    prepare_training(model, cfg, device)
    if rank == 0 and progress:
        budget = f"{cfg.train_flops:.3g} training FLOPs" if cfg.train_flops is not None else f"{cfg.max_steps} steps"
        print(f"{out}: budget {budget} = {total} steps of batch {cfg.batch_size} "
              f"({s.flops_per_sample * cfg.batch_size:.3g} FLOPs each); starting at step {start_step}")
    ddp = DistributedDataParallel(model) if world > 1 else model
    peak_box = [peak_flops(device) if rank == 0 else None]
    if world > 1:  # one measurement, not several processes competing for the same cores
        dist.broadcast_object_list(peak_box, src=0)
    peak, peak_how = peak_box[0]
    order = BatchOrder(len(labels_all), cfg.batch_size, cfg.seed)
    amp = autocast_for(device)
    model_params = [p for p in model.state_dict().values() if p.is_floating_point()]
    ema_params = [ema[k] for k, p in model.state_dict().items() if p.is_floating_point()]

    bar = tqdm(total=total, initial=start_step, disable=(rank != 0 or not progress) or None, desc=run.paradigm,
               dynamic_ncols=True, leave=False)
    # Sums over the log window and the divergence record, kept on the device: the host reads them only at
    # log and checkpoint steps, which synchronise anyway.
    window_loss, window_norm, window_good = (torch.zeros((), device=device) for _ in range(3))
    bad_count = torch.zeros((), dtype=torch.long, device=device)
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # 1-based step of the first bad batch
    window_n, t_window, last_ckpt = 0, time.perf_counter(), start_step
    log_lines = []
    model.train()
    for step in range(start_step, total):
        model.set_progress(step, total)
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        idx = torch.from_numpy(order.indices(step)[rank::world]).to(device)
        lr = lr_at(step, total, cfg)
        loss, norm, bad = train_step(ddp, model, opt, tokens_all[idx], labels_all[idx], lr, cfg.grad_clip, amp,
                                     skip_nonfinite=cfg.skip_nonfinite > 0, accum=cfg.grad_accum)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - ema_decay_at(step, cfg.ema_decay))
        flops_done += s.flops_per_sample * cfg.batch_size
        window_loss += torch.where(bad, 0.0, loss)
        window_norm += torch.where(bad, 0.0, norm)
        window_good += (~bad).float()
        first_bad = torch.where((bad_count == 0) & bad, step + 1, first_bad)
        bad_count += bad.long()
        window_n += 1
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            _check_finite(bad_count, first_bad, cfg, last_ckpt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_window
            elapsed += dt
            sps = window_n * cfg.batch_size / dt
            n_good = max(window_good.item(), 1.0)
            rec = {"step": done, "loss": round(window_loss.item() / n_good, 5),
                   "grad_norm": round(window_norm.item() / n_good, 5), "lr": lr,
                   "train_flops": flops_done, "samples_per_s": round(sps, 2),
                   "mfu": round(sps * s.flops_per_sample / (peak * world), 4), "elapsed_s": round(elapsed, 2)}
            if cfg.skip_nonfinite:
                rec["skipped_batches"] = int(bad_count.item())
            log_lines.append(json.dumps(rec))
            tracker.log(rec)
            bar.set_postfix(loss=rec["loss"], mfu=rec["mfu"])
            for t in (window_loss, window_norm, window_good):
                t.zero_()
            window_n, t_window = 0, time.perf_counter()
        grid = cfg.sample_every > 0 and (done % cfg.sample_every == 0 or done == total)  # on every rank
        save = done % cfg.ckpt_every == 0 or done == total
        if grid or save:
            t_ckpt = time.perf_counter()
            _check_finite(bad_count, first_bad, cfg, last_ckpt)
            if not all_finite(model_params + ema_params):  # never a checkpoint or grid of non-finite weights
                raise Diverged(f"training diverged by step {done}: the weights are not finite; "
                               + (f"the checkpoint of step {last_ckpt} is kept" if last_ckpt else
                                  "no checkpoint was written"))
            if grid and grids is not None:  # before the checkpoint: a run resumed from it draws no grid twice
                grids.write(done, ema, tracker)
            if save:
                last_ckpt = done
                if rank == 0:
                    append_log(out / LOG, log_lines)
                    meta = {"step": done, "total_steps": total, "train_flops": flops_done, "elapsed_s": elapsed,
                            "flops_per_sample": s.flops_per_sample, "peak_flops": peak, "peak_source": peak_how,
                            "world_size": world, "device": str(device)}
                    save_checkpoint(out / CHECKPOINT, model.state_dict(), ema, opt.state_dict(), meta)
                log_lines = []
                if world > 1:
                    dist.barrier()
            t_window += time.perf_counter() - t_ckpt  # sampling and checkpoint time are not training throughput
    bar.close()
    if rank == 0:  # the loss curve of the whole run, also after a resumption (`isynth plot` redraws it)
        loss_curves([out], out / "loss")
    return out


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of `tensors` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def append_log(path: Path, lines: list[str]) -> None:
    if lines:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again), and a line torn by
    a kill in the middle of an append."""
    if not path.exists():
        return
    text = path.read_text()
    keep = []
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
    new = "".join(ln + "\n" for ln in keep)
    if new != text:
        atomic_write_text(path, new)
