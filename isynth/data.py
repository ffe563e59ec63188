"""Datasets as uint8 NHWC arrays (the ADM evaluator convention) with a fixed, seeded held-out split.

`digits` is scikit-learn's bundled 8x8 handwritten digits (1,797 images, grey levels 0..16, 10 classes),
so every default works offline. Its levels v are stored as uint8 round(v * 255 / 16), which the 17-level
tokenizer inverts exactly. `shapes` is generated (`isynth.shapes`), with attributes instead of one class.
`npz` reads user data: `arr_0` uint8 [N, H, W, C] and `labels` int64 [N]; `folder` an image folder.
"""
from __future__ import annotations

import dataclasses
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isynth import latents, shapes
from isynth.conditions import Conditions
from isynth.config import DataConfig
from isynth.errors import IsynthError
from isynth.folder import load_folder
from isynth.memory import check_images_memory, require


@dataclass(frozen=True)
class ImageDataset:
    """Train and held-out images (uint8 [N, H, W, C]) with int64 class ids, and what the ids mean."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    conditions: Conditions
    flip: bool = False            # train on mirrored copies too (the paradigm's training data adds them)
    latents: str | None = None    # a directory of cached training tokens (`isynth tokenize`) to train on

    @property
    def num_classes(self) -> int:
        return self.conditions.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # (H, W, C)


def validate_images(images: np.ndarray, labels: np.ndarray, source: str, min_images: int = 2) -> None:
    """Raise IsynthError naming the first problem with an (images, labels) pair (a dataset needs two images
    to split; a sample file may hold one)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise IsynthError(f"{source}: images must be uint8, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < 1:
        raise IsynthError(f"{source}: images must have shape [N, H, W, C] with H, W >= 1 and C in (1, 3), "
                          f"got {list(images.shape)}")
    if images.shape[0] < min_images:
        raise IsynthError(f"{source}: need at least {min_images} images, got {images.shape[0]}")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise IsynthError(f"{source}: labels must be integers, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != (images.shape[0],):
        raise IsynthError(f"{source}: labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
    if labels.min() < 0:
        raise IsynthError(f"{source}: labels must be >= 0, found {int(labels.min())}")
    if labels.max() > np.iinfo(np.int64).max:  # uint64 beyond int64 would wrap to negative labels
        raise IsynthError(f"{source}: labels must fit in int64, found {int(labels.max())}")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    levels = d.images.astype(np.int64)  # (N, 8, 8) in 0..16
    images = np.rint(levels * 255.0 / 16.0).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    return images, d.target.astype(np.int64)


def read_npz(path: str | Path, what: str = "dataset", min_images: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate an ADM-style .npz: (images uint8 [N, H, W, C], labels int64 [N])."""
    p = Path(path)
    if not p.is_file():
        raise IsynthError(f"{what} file not found: {p}")
    try:
        # Our own handle: np.load(path) leaks its file when the zip is corrupt (it closes it only on success).
        with open(p, "rb") as fh:
            f = np.load(fh, allow_pickle=False)
            if not hasattr(f, "files"):  # a .npy file loads as one bare array
                raise IsynthError(f"{p}: not an .npz archive (found a single array)")
            with f:
                missing = [k for k in ("arr_0", "labels") if k not in f.files]
                if missing:
                    raise IsynthError(f"{p}: missing array(s) {missing}, found {f.files} "
                                      f"(want arr_0 uint8 [N, H, W, C] and labels int64 [N])")
                # The arrays' uncompressed sizes, before reading them: a file larger than memory is refused.
                require(f"reading {p}", sum(i.file_size for i in f.zip.infolist()), torch.device("cpu"),
                        "use an image folder (folder:PATH), which is read from disk as needed")
                images, labels = f["arr_0"], f["labels"]
    except IsynthError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        # zlib.error: damaged np.savez_compressed data; NotImplementedError: unknown zip compression.
        # numpy's pickle message advises loading unsafely; for a data file that is never the answer.
        why = "unknown format or pickled objects, which isynth never loads" if "pickle" in str(e) else \
            f"{type(e).__name__}: {e}"
        raise IsynthError(f"{p}: not a readable .npz file ({why})") from None
    validate_images(images, labels, str(p), min_images)
    return images, labels.astype(np.int64)


def _load_npz(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if not path:
        raise IsynthError("data.path is required for the npz dataset (use --dataset path/to/data.npz)")
    return read_npz(path)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load a dataset and split it with a seeded permutation (the same split on every machine)."""
    if cfg.name == "shapes":
        check_images_memory("the shapes dataset", cfg.num_images, (cfg.side, cfg.side, 3), "lower data.num_images")
        train, train_ids, held, held_ids, cond = shapes.generate(cfg.num_images, cfg.eval_fraction, cfg.side,
                                                                  cfg.split_seed)
        return ImageDataset("shapes", train, train_ids, held, held_ids, cond)
    if cfg.name == "latents":  # the source dataset (held-out images, conditions) with the cache beside it
        if not cfg.path:
            raise IsynthError("data.path is required for cached latents (use --dataset latents:DIR)")
        return dataclasses.replace(load_dataset(latents.source_config(cfg.path)), latents=cfg.path)
    if cfg.name == "folder":
        if not cfg.path:
            raise IsynthError("data.path is required for an image folder (use --dataset folder:PATH)")
        train, train_labels, held, held_labels, names = load_folder(cfg.path, cfg.side, cfg.eval_fraction,
                                                                    cfg.split_seed)
        return ImageDataset("folder", train, train_labels, held, held_labels,
                            Conditions(("class",), (tuple(names),)), cfg.flip)
    if cfg.name == "digits":
        images, labels = _load_digits()
    elif cfg.name == "npz":
        images, labels = _load_npz(cfg.path)
    else:  # DataConfig validates the name; kept for direct callers
        raise IsynthError(f"unknown dataset {cfg.name!r}")
    n = images.shape[0]
    num_classes = int(labels.max()) + 1
    if num_classes > n:  # labels are class indices 0..K-1; a stray huge label would size a huge class table
        raise IsynthError(f"{cfg.path or cfg.name}: labels go up to {num_classes - 1}, i.e. {num_classes} classes "
                          f"for {n} images; labels must be class indices 0..K-1 with K <= the number of images")
    n_eval = max(1, int(round(n * cfg.eval_fraction)))
    if n_eval >= n:
        raise IsynthError(f"data.eval_fraction={cfg.eval_fraction} leaves no training images out of {n}")
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    ev, tr = perm[:n_eval], perm[n_eval:]
    return ImageDataset(cfg.name, images[tr], labels[tr], images[ev], labels[ev], Conditions.classes(num_classes),
                        cfg.flip)
