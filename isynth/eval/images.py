"""Sample files (ADM evaluator `.npz`: `arr_0` uint8 [N, H, W, C] + `labels` int64 [N]) and PNG grids.

Every write goes through `isynth.files.atomic_path`, so an interrupted run never leaves a half-written
file under the final name that a later step would trust.
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from isynth.data import read_npz, validate_images
from isynth.errors import IsynthError
from isynth.files import atomic_path

GRID_MIN_WIDTH_PX = 256  # small images (8x8 digits) are upscaled until the grid is at least this wide
GRID_GAP_VALUE = 128     # mid-grey gap, visible against both dark and light backgrounds


def save_samples(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write samples as an ADM-style `.npz`; `.npz` is appended as `np.savez` would. Returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    validate_images(images, labels, str(path), min_images=1)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not a name: np.savez would append a second `.npz` to the temporary name.
        np.savez(f, arr_0=np.ascontiguousarray(images), labels=np.asarray(labels, dtype=np.int64))
    return path


def save_samples_from_shards(path: str | os.PathLike, shards: list[Path]) -> Path:
    """Concatenate sample `.npz` shards into one `.npz` without holding more than one shard in memory: each
    array is streamed into its zip member as an `.npy` header (the total shape) followed by every shard's
    bytes, exactly the file `np.savez` writes for the concatenated arrays."""
    shape, counts = None, []
    for p in shards:  # every shard read and checked, one at a time, before anything is written
        images, labels = load_samples(p)
        shape = shape or images.shape[1:]
        if images.shape[1:] != shape:
            raise IsynthError(f"{p}: shard images of shape {images.shape[1:]}, the first shard's are {shape}")
        counts.append(len(labels))
    n = sum(counts)
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, dtype, tail in (("arr_0", np.uint8, shape), ("labels", np.int64, ())):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (n, *tail)}
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for p in shards:
                    with np.load(p) as f:
                        member.write(np.ascontiguousarray(f[key], dtype=dtype).tobytes())
    return path


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a samples `.npz`: (images uint8 [N, H, W, C], labels int64 [N])."""
    return read_npz(path, what="samples", min_images=1)


def save_grid(path: str | os.PathLike, images: np.ndarray, nrow: int | None = None,
              scale: int | None = None) -> Path:
    """Tile uint8 [N, H, W, C] images into one PNG with a 1-pixel gap, nearest-neighbour upscaled."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise IsynthError(f"save_grid: images must be uint8, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
        raise IsynthError(f"save_grid: images must have shape [N, H, W, C] with N >= 1 and C in (1, 3), "
                          f"got {list(images.shape)}")
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1 or (scale is not None and scale < 1):
        raise IsynthError(f"save_grid: nrow and scale must be >= 1, got nrow={nrow}, scale={scale}")
    nrow = min(nrow, n)
    ncol_rows = math.ceil(n / nrow)
    scale = scale or max(1, math.ceil(GRID_MIN_WIDTH_PX / (nrow * w)))
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, sH, sW, C)
    sh, sw = h * scale, w * scale
    grid = np.full((ncol_rows * (sh + 1) - 1, nrow * (sw + 1) - 1, c), GRID_GAP_VALUE, dtype=np.uint8)
    for i in range(n):  # at most a few hundred tiles; a loop is clearer than a strided view
        r, k = divmod(i, nrow)
        grid[r * (sh + 1): r * (sh + 1) + sh, k * (sw + 1): k * (sw + 1) + sw] = tiles[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)  # (H, W) -> "L", (H, W, 3) -> "RGB"
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
