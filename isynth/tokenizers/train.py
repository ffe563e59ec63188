"""`isynth tokenizer train KIND`: training a learned tokenizer (vq, fsq, lfq, kl) into a directory.

The objective is a reconstruction loss (L1 or L2 on pixels in [-1, 1]), a perceptual term, and the
bottleneck's own regulariser: VQ's commitment loss (van den Oord et al. 2017), LFQ's entropy penalty and
commitment (MAGVIT-v2), the KL to N(0, I) for `kl` (LDM); FSQ has none (Mentzer et al. 2023). The perceptual
term is the MSE between the domain feature network's features (`isynth.eval.features`, frozen) of the
reconstruction and of the input: LPIPS's idea (Zhang et al. 2018) with the network isynth already trusts for
its metrics, since no ImageNet VGG may be downloaded here. VQGAN's adversarial loss (Esser et al. 2021) is left
out: it sharpens textures at ImageNet scale, but doubles the cost of a step and makes short CPU runs unstable.

The loop is the generator trainer's (`isynth.trainer`): AdamW without decay on norms and biases, warm-up then
cosine, gradient clipping, an EMA of the weights, a step or FLOPs budget, and exact resumption (batches and all
randomness of step s are functions of (seed, s); the checkpoint holds weights, EMA and optimizer state). The
EMA averages parameters only; buffers (VQ's EMA codebook, its k-means flag) are the live model's, because a
codebook averaged across dead-code replacements would hold vectors no encoder output is near.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from isynth.checkpoint import CHECKPOINT, LOG, config_changes, load_checkpoint, load_weights, save_checkpoint
from isynth.data import ImageDataset, load_dataset
from isynth.errors import Diverged, IsynthError
from isynth.eval.features import get_feature_net
from isynth.eval.images import save_grid
from isynth.eval.metrics import frechet_distances
from isynth.files import atomic_save_tensors, atomic_write_text, one_writer, read_json, sha256_file
from isynth.flops import counting, matmul_flops
from isynth.hardware import default_device
from isynth.tokenizers.learned import (
    WEIGHTS,
    KLAutoencoder,
    LearnedTokenizer,
    build_net,
    check_image_shape,
    to_float,
    tokenizer_for,
)
from isynth.tokenizers.nets import conv_flops
from isynth.tokenizers.store import FORMAT, MANIFEST
from isynth.tokenizers.trainconfig import TokenizerTrainConfig
from isynth.trainer import (
    BatchOrder,
    all_finite,
    append_log,
    autocast_for,
    build_optimizer,
    ema_decay_at,
    lr_at,
    step_seed,
    total_steps_for,
    train_step,
    truncate_log,
)

TRAIN_CONFIG, METRICS, GRID = "train_config.json", "metrics.json", "reconstructions.png"
SCALE_IMAGES = 4096  # training images whose latents measure the kl scaling factor


class Objective(nn.Module):
    """images (B, H, W, C) uint8 -> the training loss; called as `objective(images, None)` by `train_step`."""

    def __init__(self, net: nn.Module, feature_net: nn.Module | None, cfg: TokenizerTrainConfig):
        super().__init__()
        self.net, self.features, self.loss = net, feature_net, cfg.loss

    def forward(self, images: Tensor, _labels=None) -> Tensor:
        x = to_float(images)  # (B, C, H, W) in [-1, 1]
        recon, reg, _ = self.net(x)
        loss = F.l1_loss(recon, x) if self.loss.recon == "l1" else F.mse_loss(recon, x)
        loss = loss + reg
        if self.features is not None:  # unit-length features, as LPIPS normalises its activations per channel
            with torch.no_grad():
                target = F.normalize(self.features.features(x), dim=1)  # (B, F)
            ours = F.normalize(self.features.features(recon), dim=1)
            loss = loss + self.loss.perceptual * (ours - target).pow(2).sum(dim=1).mean()  # in [0, 4]
        return loss


def feature_forward_flops(feature_net: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs of the feature network on one image, counted: its architecture belongs to isynth.eval
    (a recipe per dataset), so the tokenizer trainer measures it rather than restating it."""
    device = next(feature_net.parameters()).device
    with counting() as fc, torch.no_grad():
        feature_net.features(torch.zeros(1, image_shape[2], *image_shape[:2], device=device))  # (1, C, H, W)
    return int(fc.get_total_flops())


def train_flops_per_image(tok: LearnedTokenizer, feature_fwd: int) -> int:
    """Forward + backward FLOPs of one training image: 3x the forward pass (backward = 2x forward), less the
    input gradient of the first convolution (the image needs none) and, for vq, the backward of the code
    distances (argmin has none); plus LFQ's entropy matmul (its input needs a gradient, its codebook none), and
    the perceptual term (`feature_fwd` = 0 without one): the feature network on the input, and on the
    reconstruction forward + input gradient (its weights are frozen)."""
    net = tok.net
    first = net.vae.encoder.conv_in if isinstance(net, KLAutoencoder) else net.encoder.conv_in
    total = 3 * (tok.encode_flops() + tok.decode_flops()) - conv_flops(first, *tok.image_shape[:2])
    q = getattr(net, "quantizer", None)
    if tok.kind == "vq":  # encode_flops counts the distances once, as training does
        total -= 2 * matmul_flops(tok.seq_len, q.dim, q.codebook_size)
    elif tok.kind == "lfq":
        total += 2 * matmul_flops(tok.seq_len, q.codebook_dim, q.codebook_size)
    return total + 3 * feature_fwd


def _prepare_dir(out: Path, cfg: TokenizerTrainConfig) -> None:
    """Create `out` with the training config, or check that it holds the same config (then: resume)."""
    file = out / TRAIN_CONFIG
    if file.is_file():
        saved = read_json(file, "tokenizer training config")
        changes = config_changes(saved, cfg.to_dict()) if isinstance(saved, dict) else ["not a config"]
        if changes:
            raise IsynthError(f"{out} holds a tokenizer trained with another config ({'; '.join(changes[:3])}); use "
                              "a new --out directory")
        for tmp in out.glob(".*.tmp"):  # what a killed run was writing
            tmp.unlink(missing_ok=True)
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IsynthError(f"{out} exists and is not a tokenizer training directory; use a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, cfg.to_json())


@one_writer("out")
def train_tokenizer(cfg: TokenizerTrainConfig, out: str | Path, progress: bool = True) -> dict:
    """Train (or resume, or finish) the tokenizer of `cfg` into `out`; returns its metrics."""
    out, device, t = Path(out), default_device(), cfg.train
    dataset = load_dataset(cfg.data)  # everything is checked before the directory is touched
    shape = dataset.image_shape
    check_image_shape(shape, cfg.model.downsample, "model.downsample")
    torch.manual_seed(t.seed)
    net = build_net(cfg.kind, cfg.model, shape, cfg.loss.commit, cfg.loss.entropy, cfg.loss.kl).to(device)
    tok = tokenizer_for(cfg.kind, net, cfg.model, shape)
    feature_net = get_feature_net(dataset).to(device)
    perceptual = feature_net if cfg.loss.perceptual > 0 else None
    per_image = train_flops_per_image(tok, feature_forward_flops(feature_net, shape) if perceptual else 0)
    total = total_steps_for(t, per_image)
    images = torch.from_numpy(np.array(dataset.train_images)).to(device)  # (N, H, W, C)
    _prepare_dir(out, cfg)

    opt = build_optimizer(net, t, device)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    start, flops_done, elapsed = 0, 0.0, 0.0
    if (out / CHECKPOINT).exists():
        weights, ema_w, opt_state, meta = load_checkpoint(out / CHECKPOINT)
        load_weights(net, weights, out / CHECKPOINT)
        ema = {k: v.to(device) for k, v in ema_w.items()}
        opt.load_state_dict(opt_state)
        start, flops_done, elapsed = meta["step"], meta["train_flops"], meta["elapsed_s"]
    truncate_log(out / LOG, start)
    if start >= total and (out / MANIFEST).is_file() and (out / METRICS).is_file():
        if progress:
            print(f"{out}: already trained for {total} steps")
        return read_json(out / METRICS, "tokenizer metrics")

    objective, amp = Objective(net, perceptual, cfg), autocast_for(device)
    order = BatchOrder(len(images), t.batch_size, t.seed)
    params = {k for k, _ in net.named_parameters()}
    live = [p for k, p in net.named_parameters()]
    averaged = [ema[k] for k, _ in net.named_parameters()]
    bar = tqdm(total=total, initial=start, disable=not progress or None, desc=f"tokenizer {cfg.kind}", leave=False)
    window, lines, t0 = [], [], time.perf_counter()
    net.train()
    for step in range(start, total):
        torch.manual_seed(step_seed(t.seed, step, 0))
        idx = torch.from_numpy(order.indices(step)).to(device)
        lr = lr_at(step, total, t)
        window.append(train_step(objective, net, opt, images[idx], None, lr, t.grad_clip, amp)[0])
        with torch.no_grad():
            torch._foreach_lerp_(averaged, live, 1.0 - ema_decay_at(step, t.ema_decay))
        flops_done += per_image * t.batch_size
        bar.update(1)
        done = step + 1
        if done % t.log_every == 0 or done == total:
            dt = time.perf_counter() - t0
            elapsed += dt
            mean_loss = torch.stack(window).mean().item()
            if not math.isfinite(mean_loss):  # as the generator's trainer: stop, keep the last good checkpoint
                raise Diverged(f"tokenizer training diverged by step {done}: the loss is not finite; the last "
                               "checkpoint is kept (lower train.lr)")
            rec = {"step": done, "loss": round(mean_loss, 5), "lr": lr,
                   "train_flops": flops_done, "samples_per_s": round(len(window) * t.batch_size / dt, 2),
                   "elapsed_s": round(elapsed, 2)}
            lines.append(json.dumps(rec))
            bar.set_postfix(loss=rec["loss"])
            window, t0 = [], time.perf_counter()
        if done % t.ckpt_every == 0 or done == total:
            t_ckpt = time.perf_counter()
            state = net.state_dict()
            if not all_finite([v for v in state.values() if v.is_floating_point()]):
                raise Diverged(f"tokenizer training diverged by step {done}: the weights are not finite; the "
                               "last checkpoint is kept (lower train.lr)")
            ema.update({k: v.detach().clone() for k, v in state.items() if k not in params})  # live buffers
            append_log(out / LOG, lines)
            lines = []
            save_checkpoint(out / CHECKPOINT, state, ema, opt.state_dict(),
                            {"step": done, "total_steps": total, "train_flops": flops_done, "elapsed_s": elapsed,
                             "flops_per_image": per_image, "device": str(device)})
            t0 += time.perf_counter() - t_ckpt
    bar.close()
    return _finish(cfg, out, dataset, net, ema, feature_net, total, flops_done, per_image, elapsed)


@torch.no_grad()
def _scaling_factor(net: KLAutoencoder, images: Tensor) -> float:
    """1 / std of the posterior means of the first training images: latents of roughly unit variance (LDM
    sec. 4.3.2, where Stable Diffusion's 0.18215 comes from)."""
    means = [net.moments(to_float(c))[0] for c in images[:SCALE_IMAGES].split(256)]
    return float(1.0 / torch.cat(means).float().std())


def _finish(cfg: TokenizerTrainConfig, out: Path, dataset: ImageDataset, net: nn.Module, ema: dict,
            feature_net: nn.Module, total: int, flops_done: float, per_image: int, elapsed: float) -> dict:
    """EMA weights, manifest and metrics. Deterministic, so a kill part-way is finished by re-running."""
    net.load_state_dict(ema)
    net.eval()
    shape = dataset.image_shape
    device = next(net.parameters()).device
    scale = None
    if cfg.kind == "kl":
        scale = _scaling_factor(net, torch.from_numpy(np.array(dataset.train_images[:SCALE_IMAGES])).to(device))
    tok = tokenizer_for(cfg.kind, net, cfg.model, shape, 1, scale or 1.0)
    atomic_save_tensors(out / WEIGHTS, {k: v.detach().cpu().contiguous() for k, v in ema.items()})
    metrics, recon = evaluate_tokenizer(tok, dataset, feature_net)
    n = min(16, len(recon))
    k = min(64, len(recon)) // n * n  # rows of n held-out images, each followed by their reconstructions
    pairs = np.stack([dataset.eval_images[:k].reshape(-1, n, *shape), recon[:k].reshape(-1, n, *shape)], axis=1)
    save_grid(out / GRID, pairs.reshape(-1, *shape), nrow=n)  # (rows, 2, n, H, W, C) -> (2 k, H, W, C)
    manifest = {"format": FORMAT, "kind": cfg.kind, "config": cfg.to_dict(), "image_shape": list(shape),
                "latent_grid": list(net.grid), "grid": list(tok.grid), "discrete": tok.discrete,
                "vocab_size": tok.vocab_size, "token_dim": tok.token_dim,
                "latent_channels": tok.token_dim if scale else None, "scaling_factor": scale,
                "dataset": cfg.to_dict()["data"], "steps": total, "train_flops": flops_done,
                "train_flops_per_image": per_image, "train_seconds": round(elapsed, 2),
                "encode_flops": tok.encode_flops(), "decode_flops": tok.decode_flops(),
                "weights": WEIGHTS, "weights_sha256": sha256_file(out / WEIGHTS)}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    metrics = {"kind": cfg.kind, "steps": total, "train_flops": flops_done, "train_seconds": round(elapsed, 2),
               **metrics}
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2) + "\n")
    return metrics


def _timed(fn, x: Tensor) -> tuple[Tensor, float]:
    fn(x[:8])  # warm-up: first-call allocations and kernel selection
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return y, time.perf_counter() - t0


def evaluate_tokenizer(tok: LearnedTokenizer, dataset: ImageDataset, feature_net: nn.Module) -> tuple[dict, np.ndarray]:
    """Reconstruction quality on the held-out split, through the tokens: PSNR (mean over images), rFD
    (Fréchet distance of the reconstructions to the held-out images in the feature net's space; `rfd_floor`
    is what the training images score), for discrete kinds the share of codes used and the perplexity of their
    histogram, and encode / decode throughput on this machine. Also returns the reconstructions."""
    device = tok.device
    real = np.ascontiguousarray(dataset.eval_images)
    tokens, t_enc = _timed(tok.encode, torch.from_numpy(np.array(real)).to(device))
    recon, t_dec = _timed(tok.decode, tokens)
    recon = recon.cpu().numpy()
    mse = ((recon.astype(np.float64) - real.astype(np.float64)) ** 2).reshape(len(real), -1).mean(axis=1)
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    floor_images = dataset.train_images[:len(real)]
    rfd, floor = frechet_distances(feature_net.cpu(), real, [recon, np.ascontiguousarray(floor_images)])
    feature_net.to(device)
    out = {"psnr": round(float(psnr.mean()), 3), "rfd": round(rfd, 4), "rfd_floor": round(floor, 4),
           "num_eval_images": len(real), "grid": list(tok.grid), "token_dim": tok.token_dim,
           "vocab_size": tok.vocab_size, "encode_flops_per_image": tok.encode_flops(),
           "decode_flops_per_image": tok.decode_flops(), "encode_images_per_s": round(len(real) / t_enc, 1),
           "decode_images_per_s": round(len(real) / t_dec, 1), "threads": torch.get_num_threads(),
           "device": str(device)}
    if tok.discrete:
        counts = torch.bincount(tokens.flatten().cpu(), minlength=tok.vocab_size).double()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        out |= {"codebook_usage": round(float((counts > 0).double().mean()), 4),
                "perplexity": round(float(entropy.exp()), 2)}
    return out, recon
