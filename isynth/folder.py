"""Image folders (`--dataset folder:PATH`): one subfolder per class (the ImageFolder convention), or images
directly in PATH for unconditional data (one class).

Every image is resized and centre-cropped to `data.image_size` as ADM, DiT and MAR prepare ImageNet (box
downsampling by halves while the image is at least twice the target, then bicubic, then the central crop),
and decoded once into a uint8 array cached on disk (`$ISYNTH_CACHE/folders/`, keyed by the file list, their
sizes and modification times, and the image size). The array is memory-mapped, so a dataset larger than
memory is read from disk as training asks for it.

What isynth will not guess: a folder that mixes grey and colour images, images with transparency or a
palette, or images smaller than the target (they would be upsampled) are refused with one line naming a
file. Unreadable or truncated files are skipped with a count on stderr, and refused when every file fails.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from isynth.errors import IsynthError
from isynth.files import atomic_path
from isynth.hardware import cache_dir

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
MODES = {"L": 1, "RGB": 3}  # the modes read as they are: grey and colour


def list_images(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, class index of each, class names): subfolders are classes; loose files mean one class."""
    if not root.is_dir():
        raise IsynthError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if subdirs and loose:
        raise IsynthError(f"{root} has both class subfolders and loose images (e.g. {loose[0].name}): use one "
                          "subfolder per class, or only loose images for unconditional data")
    groups = [(d.name, sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS))
              for d in subdirs] if subdirs else [("all", loose)]
    groups = [(name, files) for name, files in groups if files]
    files = [f for _, fs in groups for f in fs]
    if not files:
        raise IsynthError(f"{root} holds no images ({', '.join(sorted(EXTENSIONS))})")
    labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, (_, fs) in enumerate(groups)])
    return files, labels, [name for name, _ in groups]


def center_crop(image: Image.Image, side: int) -> np.ndarray:
    """ADM's `center_crop_arr`: box-downsample by halves, bicubic to the target's short side, central crop."""
    while min(image.size) >= 2 * side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = side / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    return arr[top:top + side, left:left + side]


def _key(files: list[Path], side: int, eval_fraction: float, split_seed: int) -> str:
    h = hashlib.sha256(f"folder-v1:{side}:{eval_fraction}:{split_seed}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_folder(root: str, side: int, eval_fraction: float, split_seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(training images, labels, held-out images, labels, class names): uint8 [N, side, side, C] arrays
    memory-mapped from the cache, split by a seeded permutation as every dataset is."""
    path = Path(root)
    files, labels, names = list_images(path)
    cached = cache_dir() / "folders" / _key(files, side, eval_fraction, split_seed)
    if not (cached / "meta.json").is_file():
        building = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        try:
            _build_cache(files, labels, side, path, eval_fraction, split_seed, building)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(building, cached)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    meta = json.loads((cached / "meta.json").read_text())
    return (np.load(cached / "train.npy", mmap_mode="r"), np.asarray(meta["train_labels"], dtype=np.int64),
            np.load(cached / "eval.npy", mmap_mode="r"), np.asarray(meta["eval_labels"], dtype=np.int64), names)


def _build_cache(files: list[Path], labels: np.ndarray, side: int, root: Path, eval_fraction: float,
                 split_seed: int, cached: Path) -> None:
    """Decode every image once into a memory-mapped array on disk, then write the two splits in the order of
    the seeded permutation, a chunk at a time (never the whole dataset in memory)."""
    cached.mkdir(parents=True, exist_ok=True)
    decoded = cached / ".decoded.npy"
    images, keep = _decode(files, side, root, decoded)
    n = len(keep)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise IsynthError(f"{root}: data.eval_fraction={eval_fraction} leaves no training images out of {n}")
    perm = np.random.default_rng(split_seed).permutation(n)
    splits = {"eval": perm[:n_eval], "train": perm[n_eval:]}
    for name, rows in splits.items():
        with atomic_path(cached / f"{name}.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:]))
            for i in range(0, len(rows), 1024):
                out[i:i + 1024] = images[rows[i:i + 1024]]
            out.flush()
            del out
    del images
    decoded.unlink(missing_ok=True)
    meta = {"root": str(root.resolve()), "train_labels": labels[keep][splits["train"]].tolist(),
            "eval_labels": labels[keep][splits["eval"]].tolist()}
    with atomic_path(cached / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta))


def _decode(files: list[Path], side: int, root: Path, out_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images of the readable files, memory-mapped at out_path, their indices into `files`)."""
    out, keep, mode_of, failed = None, [], None, []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im.load()
                mode, size = im.mode, im.size
                if mode not in MODES:
                    raise IsynthError(f"{f}: {mode} image; isynth reads grey (L) and colour (RGB) images and does "
                                      "not guess how to flatten transparency or a palette: convert the folder")
                if min(size) < side:
                    raise IsynthError(f"{f}: {size[0]}x{size[1]} is smaller than data.image_size={side} "
                                      "(it would be upsampled); use a smaller data.image_size")
                arr = center_crop(im, side)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            failed.append((f, e))
            continue
        if mode_of is None:
            mode_of = (mode, f)
            out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8,
                                            shape=(len(files), side, side, MODES[mode]))
        elif mode != mode_of[0]:
            raise IsynthError(f"{root} mixes {mode_of[0]} ({mode_of[1].name}) and {mode} ({f.name}) images; "
                              "convert them to one mode")
        out[len(keep)] = arr.reshape(side, side, -1)
        keep.append(i)
    if not keep:
        f, e = failed[0]
        raise IsynthError(f"{root}: none of its {len(files)} image files could be read (e.g. {f.name}: {e})")
    if failed:
        print(f"isynth: skipped {len(failed)} unreadable image file(s) in {root}, e.g. {failed[0][0].name}",
              file=sys.stderr)
    return out[:len(keep)], np.array(keep, dtype=np.int64)
