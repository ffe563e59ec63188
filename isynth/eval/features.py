"""The domain attribute network: a small CNN with one classification head per attribute, cached on disk.

Inception-v3 features (Heusel et al. 2017) mean little on 8x8 greyscale digits or 32x32 procedural shapes,
so FD-<dataset>, precision/recall, the classifier score and prompt following are all measured with this
network instead: its 64 penultimate features are the space of FD and precision/recall, and its heads, one
per attribute of the dataset's `Conditions` (one 10-way head for digits; shape, colour, size and position
for shapes), say which attribute values a sample shows. Scoring a sample attribute by attribute against the
attributes that were asked for is GenEval's protocol (Ghosh et al. 2023) with the detector replaced by a
classifier that knows the domain.

Labelled data (digits, .npz, folders) trains the net on its training split. `shapes` is generated, so the
evaluator may know the ground truth: it trains on its own freshly drawn set that covers every combination,
the held-out (shape, colour) pairs included, equally often; a ruler that never saw a held-out pair could not
tell whether a model composed it. Training is deterministic (fixed seeds, fixed epochs, one thread, local
generators), so every machine that trains on the same data gets the same evaluator; the weights are cached in
a file named by a hash of the training data and the recipe's version. Its accuracy on the real held-out split
is measured on every load (a forward pass), so a cached net serves every size of a dataset.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from isynth import shapes
from isynth.conditions import Conditions
from isynth.data import ImageDataset
from isynth.errors import IsynthError
from isynth.files import atomic_path
from isynth.hardware import cache_dir as default_cache_dir

SEED = 0                  # initialisation and batch order
DRAW_SEED = 7_919         # shapes drawn for the net: a stream of their own, not the dataset's (split_seed)
MIN_SIDE_PX = 8
INFER_BATCH = 512


@dataclass(frozen=True)
class Recipe:
    """How an attribute net is built and trained. `version` names all of it and is part of the cache key:
    change a field, change the version."""

    version: str
    width: int                 # channels of the first convolution
    pooled: bool               # False: two full-resolution convs (digits); True: three convs, 2x max-pool between
    epochs: int
    batch_size: int
    lr: float                  # Adam, cosine-annealed to 0 over all steps
    max_shift_px: int          # random translation of each training image (0: none)
    drawn_per_class: int = 0   # > 0: train on this many freshly drawn images of every class (shapes)


# Labelled data: the original feature net, unchanged (its version string keeps digits' nets and metrics).
LABELLED = Recipe("featurenet-v1:conv32-conv64-pool4-fc64:adam2e-3-cos-e20-b64-shift1-seed0", width=32,
                  pooled=False, epochs=20, batch_size=64, lr=2e-3, max_shift_px=1)
# shapes: two full-resolution 3x3 convs see 5 px, too little to tell a square from a circle or a diamond
# (objects span 8-14 px at 32x32); with that net shape accuracy stayed at 30-40% within this budget, while
# max-pooling between three convs (18 px receptive field) reaches ~99% in ~20 s on one core. No shift: it
# would move an object by a pixel towards another position cell, and the draws already jitter positions.
SHAPES = Recipe("attributenet-shapes-v1:conv16-max2-conv32-max2-conv64-pool4-fc64:adam4e-3-cos-e12-b32:"
                f"drawn8-seed{DRAW_SEED}", width=16, pooled=True, epochs=12, batch_size=32, lr=4e-3,
                max_shift_px=0, drawn_per_class=8)
VERSION = LABELLED.version


def recipe_for(dataset: ImageDataset) -> Recipe:
    return SHAPES if dataset.name == "shapes" else LABELLED


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) -> float32 NCHW in [-1, 1], the network's input."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # shapes' cached arrays are read-only, which torch warns about
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise IsynthError(f"feature net input must be uint8 [N, H, W, C], got {x.dtype} {list(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)


def _trunk(channels: int, width: int, num_features: int, pooled: bool) -> nn.Sequential:
    if not pooled:  # the module order is the initialisation order: digits' nets depend on it
        return nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),  # (N, 2 * width * 16)
            nn.Linear(2 * width * 16, num_features), nn.GELU(),
        )
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (N, w, H/2, W/2)
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (N, 2w, H/4, W/4)
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),  # (N, 4 * width * 16)
        nn.Linear(4 * width * 16, num_features), nn.GELU(),
    )


class AttributeNet(nn.Module):
    """A conv trunk -> fc(64) -> GELU (the features) -> one linear head per attribute.

    The heads are one `nn.Linear` whose outputs are the attributes' logits side by side (`sizes` wide each):
    with one attribute it is exactly the original 10-way digits classifier, parameters and initialisation
    alike. `forward` returns the 64 penultimate features so the module plugs into torchmetrics'
    `FrechetInceptionDistance(feature=net)`, which calls it with uint8 NCHW images.
    """

    def __init__(self, image_shape: tuple[int, int, int], sizes: int | Sequence[int], recipe: Recipe = LABELLED,
                 num_features: int = 64):
        super().__init__()
        h, w, c = image_shape
        sizes = (sizes,) if isinstance(sizes, int) else tuple(int(s) for s in sizes)
        if h < MIN_SIDE_PX or w < MIN_SIDE_PX:
            raise IsynthError(f"feature net needs images of at least {MIN_SIDE_PX}x{MIN_SIDE_PX}, got {h}x{w}")
        if not sizes or min(sizes) < 2:
            raise IsynthError(f"feature net needs at least 2 classes per attribute, got {list(sizes)}")
        self.image_shape = (h, w, c)
        self.sizes = sizes
        self.recipe = recipe
        self.num_classes = int(np.prod(sizes))
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image
        self.eval_accuracy = float("nan")  # all attributes right, on the real held-out split (get_feature_net)
        self.heldout_accuracy: float | None = None  # the same on its held-out classes, where it has any
        self.train_seconds = float("nan")
        self.trunk = _trunk(c, recipe.width, num_features, recipe.pooled)
        self.head = nn.Linear(num_features, sum(sizes))

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
        return self.head(self.features(x))  # (N, sum(sizes)): every attribute's logits side by side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, sum(sizes)) logits -> (N, K) the most likely value of each attribute."""
        return torch.stack([part.argmax(-1) for part in logits.split(self.sizes, dim=-1)], dim=1)


FeatureNet = AttributeNet  # its first name: the features are what FD and precision/recall use


@torch.no_grad()
def embed(net: AttributeNet, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), logits (N, sum(sizes))) of uint8 NHWC images, in batches to bound memory."""
    feats, logits = [], []
    for i in range(0, len(images), INFER_BATCH):
        f = net.features(to_input(images[i:i + INFER_BATCH]))
        feats.append(f)
        logits.append(net.head(f))
    return torch.cat(feats).float().cpu(), torch.cat(logits).float().cpu()


def attributes_correct(net: AttributeNet, logits: torch.Tensor, labels: np.ndarray,
                       conditions: Conditions) -> torch.Tensor:
    """(N, K) bool: whether each attribute the net reads off an image is the one class id `labels` names."""
    want = torch.from_numpy(conditions.class_attrs()[np.asarray(labels, dtype=np.int64)])  # (N, K)
    return net.predict(logits) == want


def accuracy(net: AttributeNet, images: np.ndarray, labels: np.ndarray, conditions: Conditions | None = None
             ) -> float:
    """Fraction of images whose every attribute is read as its label's (for one attribute: class accuracy;
    `conditions` may then be left out)."""
    if conditions is None:
        if len(net.sizes) != 1:
            raise IsynthError(f"accuracy: a net with {len(net.sizes)} attributes needs the dataset's conditions")
        conditions = Conditions.classes(net.sizes[0])
    _, logits = embed(net, images)
    return float(attributes_correct(net, logits, labels, conditions).all(dim=1).double().mean())


def training_set(dataset: ImageDataset, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, (N, K) attribute values) the net trains on: the training split, or for shapes a
    fresh, balanced draw of every class (`recipe.drawn_per_class` images each) at the dataset's size."""
    if recipe.drawn_per_class <= 0:
        return dataset.train_images, dataset.conditions.class_attrs()[dataset.train_labels]
    return _drawn(dataset.image_shape[0], recipe.drawn_per_class)


@functools.lru_cache(maxsize=2)
def _drawn(side: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Every shapes class `per_class` times, drawn once per process (hashed for the cache key, then trained on)."""
    cond = shapes.conditions()
    attrs = cond.class_attrs()[np.arange(per_class * cond.num_classes) % cond.num_classes]  # (N, K)
    images = shapes.draw(attrs, side, np.random.default_rng([DRAW_SEED, side]))
    for a in (images, attrs):
        a.setflags(write=False)  # shared by the cache
    return images, attrs


def _shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_px` pixels, filling with the background value -1."""
    n, _, h, w = x.shape
    m = max_px
    padded = F.pad(x, (m, m, m, m), value=-1.0)  # (N, C, H + 2m, W + 2m)
    dy = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]  # (N, C, H, W)


def _loss(logits: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Sum over attributes of each head's cross-entropy (with one attribute: the plain classifier loss)."""
    parts = logits.split(sizes, dim=-1)
    loss = F.cross_entropy(parts[0], y[:, 0])
    for k in range(1, len(parts)):
        loss = loss + F.cross_entropy(parts[k], y[:, k])
    return loss


def _train(dataset: ImageDataset) -> AttributeNet:
    """Deterministic Adam training (on the training split, or on shapes' own draw; never the eval split).

    One intra-op thread: the tensors are tiny, so a second thread buys little and stalls badly when the
    cores are shared, and a fixed thread count keeps the float reductions the same on every machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(dataset, recipe_for(dataset))
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(dataset: ImageDataset, recipe: Recipe) -> AttributeNet:
    images, attrs = training_set(dataset, recipe)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(SEED)
        net = AttributeNet(dataset.image_shape, dataset.conditions.sizes, recipe)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.from_numpy(np.array(images))  # uint8 (N, H, W, C), a writable copy; to [-1, 1] a batch at a time
    y = torch.from_numpy(np.array(attrs, dtype=np.int64))  # (N, K)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    steps_per_epoch = max(1, len(x) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps_per_epoch)
    net.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            batch = to_input(x[idx])  # (B, C, H, W)
            if recipe.max_shift_px:
                batch = _shift(batch, recipe.max_shift_px, gen)
            loss = _loss(net.head(net.trunk(batch)), y[idx], net.sizes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net


def _data_hash(dataset: ImageDataset) -> str:
    """Hash of everything the net's weights depend on: the recipe, the image shape, the attributes and the
    training data (for shapes the drawn set, so a change to the generator retrains the net)."""
    recipe = recipe_for(dataset)
    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update(f"{dataset.image_shape}{dataset.conditions.sizes}".encode())
    for a in training_set(dataset, recipe):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def cache_path(dataset: ImageDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dataset's net is cached: `cache_dir`, else $ISYNTH_CACHE, else ~/.cache/isynth."""
    return Path(cache_dir or default_cache_dir()) / f"attributenet-{dataset.name}-{_data_hash(dataset)}.safetensors"


def _metadata(dataset: ImageDataset, path: Path) -> dict:
    return {"version": recipe_for(dataset).version, "file": path.name, "dataset": dataset.name,
            "image_shape": list(dataset.image_shape), "sizes": list(dataset.conditions.sizes)}


def _try_load(path: Path, dataset: ImageDataset) -> AttributeNet | None:
    """The cached net, or None if the file is missing, unreadable or for other data or code."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["isynth"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        if any(meta.get(k) != v for k, v in _metadata(dataset, path).items()):
            return None
        net = AttributeNet(dataset.image_shape, dataset.conditions.sizes, recipe_for(dataset))
        net.load_state_dict(state, strict=True)
        net.train_seconds = float(meta.get("train_seconds", float("nan")))
    except Exception:  # any corruption (truncated header, bad JSON, wrong tensors) means: retrain
        return None
    return net


def _measure(net: AttributeNet, dataset: ImageDataset) -> None:
    """The net's own accuracy on the real held-out split, all classes and held-out classes separately."""
    _, logits = embed(net, dataset.eval_images)
    right = attributes_correct(net, logits, dataset.eval_labels, dataset.conditions).all(dim=1)  # (N,)
    net.eval_accuracy = float(right.double().mean())
    held = torch.from_numpy(np.isin(dataset.eval_labels, dataset.conditions.heldout))
    net.heldout_accuracy = float(right[held].double().mean()) if bool(held.any()) else None


def get_feature_net(dataset: ImageDataset, cache_dir: str | os.PathLike | None = None) -> AttributeNet:
    """The dataset's attribute net in eval mode, loaded from the cache or trained (seconds) and cached, with
    its accuracy on the dataset's held-out split measured.

    Cache directory: `cache_dir`, else $ISYNTH_CACHE, else ~/.cache/isynth.
    """
    path = cache_path(dataset, cache_dir)
    net = _try_load(path, dataset)
    if net is None:
        start = time.perf_counter()
        net = _train(dataset).eval()
        net.train_seconds = time.perf_counter() - start
        meta = {"isynth": json.dumps({**_metadata(dataset, path), "train_seconds": net.train_seconds})}
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(save(state, metadata=meta))  # bytes, so the file gets the usual umask mode
        except OSError as e:  # an unwritable cache costs a retrain next time, not the evaluation
            warnings.warn(f"could not cache the feature net at {path}: {e}", stacklevel=2)
    net.cache_path = path
    net = net.eval().requires_grad_(False)
    _measure(net, dataset)
    return net


get_attribute_net = get_feature_net
