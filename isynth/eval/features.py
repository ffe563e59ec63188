"""A domain feature network: a small CNN classifier trained on the dataset itself, cached on disk.

Inception-v3 features (Heusel et al. 2017) mean little on 8x8 greyscale digits, so FD-<dataset>,
precision/recall, the classifier score and prompt-following accuracy are all measured in the
penultimate layer of this network instead. Training is deterministic (fixed seed, fixed epochs, local
generator), so every machine that trains it on the same data gets the same evaluator; the weights are
cached in a file named by a hash of the data and `VERSION`, so different data never reuses a net.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from isynth.data import ImageDataset
from isynth.errors import IsynthError
from isynth.files import atomic_path
from isynth.hardware import cache_dir as default_cache_dir

# Bump whenever the architecture or the training recipe changes: it is part of the cache key.
VERSION = "featurenet-v1:conv32-conv64-pool4-fc64:adam2e-3-cos-e20-b64-shift1-seed0"
SEED = 0
EPOCHS = 20
BATCH_SIZE = 64
LR = 2e-3
MAX_SHIFT_PX = 1          # random translation, the one augmentation that keeps a digit a digit
MIN_SIDE_PX = 8
INFER_BATCH = 512


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) -> float32 NCHW in [-1, 1], the network's input."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise IsynthError(f"feature net input must be uint8 [N, H, W, C], got {x.dtype} {list(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)


class FeatureNet(nn.Module):
    """conv3x3 -> GELU -> conv3x3 -> GELU -> avg-pool to 4x4 -> fc(64) -> GELU -> fc(num_classes).

    `forward` returns the 64 penultimate features so the module plugs into torchmetrics'
    `FrechetInceptionDistance(feature=net)`, which calls it with uint8 NCHW images.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, num_features: int = 64,
                 width: int = 32):
        super().__init__()
        h, w, c = image_shape
        if h < MIN_SIDE_PX or w < MIN_SIDE_PX:
            raise IsynthError(f"feature net needs images of at least {MIN_SIDE_PX}x{MIN_SIDE_PX}, got {h}x{w}")
        if num_classes < 2:
            raise IsynthError(f"feature net needs at least 2 classes, got {num_classes}")
        self.image_shape = (h, w, c)
        self.num_classes = num_classes
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image
        self.eval_accuracy = float("nan")  # set by get_feature_net
        self.trunk = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),  # (N, 2 * width * 16)
            nn.Linear(2 * width * 16, num_features), nn.GELU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Accept uint8 NCHW (torchmetrics' convention) or float NCHW already in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != self.image_shape[2] or tuple(x.shape[2:]) != self.image_shape[:2]:
            raise IsynthError(f"feature net expects [N, {self.image_shape[2]}, {self.image_shape[0]}, "
                              f"{self.image_shape[1]}] images, got {list(x.shape)}")
        device = next(self.parameters()).device
        if x.dtype == torch.uint8:
            return x.to(device).float() / 127.5 - 1.0
        return x.to(device=device, dtype=torch.float32)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self._prepare(x))  # (N, num_features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@torch.no_grad()
def embed(net: FeatureNet, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), logits (N, K)) of uint8 NHWC images, in batches to bound memory."""
    feats, logits = [], []
    for i in range(0, len(images), INFER_BATCH):
        f = net.features(to_input(images[i:i + INFER_BATCH]))
        feats.append(f)
        logits.append(net.head(f))
    return torch.cat(feats).float().cpu(), torch.cat(logits).float().cpu()


def accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose argmax class is the label."""
    _, logits = embed(net, images)
    return float((logits.argmax(-1) == torch.as_tensor(labels)).double().mean())


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT_PX pixels, filling with the background value -1."""
    n, _, h, w = x.shape
    m = MAX_SHIFT_PX
    padded = F.pad(x, (m, m, m, m), value=-1.0)  # (N, C, H + 2m, W + 2m)
    dy = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]  # (N, C, H, W)


def _train(dataset: ImageDataset) -> FeatureNet:
    """Deterministic Adam training on the training split only (the eval split stays held out).

    One intra-op thread: the tensors are tiny, so a second thread buys little and stalls badly when the
    cores are shared, and a fixed thread count keeps the float reductions the same on every machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(dataset)
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(dataset: ImageDataset) -> FeatureNet:
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(SEED)
        net = FeatureNet(dataset.image_shape, dataset.num_classes)
    gen = torch.Generator().manual_seed(SEED)
    x = to_input(dataset.train_images)  # (N, C, H, W)
    y = torch.as_tensor(dataset.train_labels, dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    steps_per_epoch = max(1, len(x) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch)
    net.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH_SIZE:(s + 1) * BATCH_SIZE]
            loss = F.cross_entropy(net.head(net.trunk(_shift(x[idx], gen))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net


def _data_hash(dataset: ImageDataset) -> str:
    """Hash of everything the cached net depends on; the eval split too, because eval_accuracy is stored."""
    h = hashlib.sha256(VERSION.encode())
    for a in (dataset.train_images, dataset.train_labels, dataset.eval_images, dataset.eval_labels):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(dataset.num_classes).encode())
    return h.hexdigest()[:16]


def _metadata(dataset: ImageDataset, digest: str, eval_accuracy: float) -> dict:
    return {"version": VERSION, "data_hash": digest, "dataset": dataset.name,
            "image_shape": list(dataset.image_shape), "num_classes": dataset.num_classes,
            "eval_accuracy": eval_accuracy}


def _try_load(path: Path, dataset: ImageDataset, digest: str) -> FeatureNet | None:
    """The cached net, or None if the file is missing, unreadable or for other data or code."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["isynth"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        expected = _metadata(dataset, digest, 0.0)
        if any(meta.get(k) != v for k, v in expected.items() if k != "eval_accuracy"):
            return None
        net = FeatureNet(dataset.image_shape, dataset.num_classes)
        net.load_state_dict(state, strict=True)
        net.eval_accuracy = float(meta["eval_accuracy"])
    except Exception:  # any corruption (truncated header, bad JSON, wrong tensors) means: retrain
        return None
    return net


def get_feature_net(dataset: ImageDataset, cache_dir: str | os.PathLike | None = None) -> FeatureNet:
    """The dataset's feature net in eval mode, loaded from the cache or trained (seconds) and cached.

    Cache directory: `cache_dir`, else $ISYNTH_CACHE, else ~/.cache/isynth.
    """
    digest = _data_hash(dataset)
    path = Path(cache_dir or default_cache_dir()) / f"featurenet-{dataset.name}-{digest}.safetensors"
    net = _try_load(path, dataset, digest)
    if net is None:
        net = _train(dataset).eval()
        net.eval_accuracy = accuracy(net, dataset.eval_images, dataset.eval_labels)
        meta = {"isynth": json.dumps(_metadata(dataset, digest, net.eval_accuracy))}
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(save(state, metadata=meta))  # bytes, so the file gets the usual umask mode
        except OSError as e:  # an unwritable cache costs a retrain next time, not the evaluation
            warnings.warn(f"could not cache the feature net at {path}: {e}", stacklevel=2)
    net.cache_path = path
    return net.eval().requires_grad_(False)
