"""`shapes`: a procedural, compositional RGB dataset whose ground truth is known exactly.

Each image is one object on a dark, lightly textured background, with four attributes: shape (5), colour
(6), size (2) and position (a 3x3 grid, jittered). A class id is one combination of the four (540 in all,
`isynth.conditions`), so prompt following can be scored attribute by attribute, as GenEval does with
detectors on text-to-image models. A fixed 10% of the (shape, colour) pairs (3 of 30) never appears in the
training split, only in the held-out split: a model asked for them shows whether it composes attributes it
learned separately.

Images are drawn from signed distance functions on a 4x supersampled grid (anti-aliased edges), in numpy,
from one seeded generator: the same configuration gives the same bytes on every machine.
"""
from __future__ import annotations

import functools

import numpy as np

from isynth.conditions import Conditions

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40),
           "magenta": (220, 50, 220), "cyan": (40, 210, 220)}
SIZES = ("small", "large")
POSITIONS = tuple(f"{row}-{col}" for row in ("top", "middle", "bottom") for col in ("left", "centre", "right"))
HELDOUT_PAIRS = (("circle", "green"), ("triangle", "magenta"), ("cross", "yellow"))  # 10% of 30
CONDITIONS_NAMES = ("shape", "colour", "size", "position")
_SUPERSAMPLE = 4
_CHUNK = 512  # images drawn at once (bounds memory: chunk x (4 side)^2 floats)


def conditions() -> Conditions:
    values = (SHAPES, tuple(COLOURS), SIZES, POSITIONS)
    base = Conditions(CONDITIONS_NAMES, values)
    attrs = base.class_attrs()
    held = [SHAPES.index(s) * len(COLOURS) + list(COLOURS).index(c) for s, c in HELDOUT_PAIRS]
    pair = attrs[:, 0] * len(COLOURS) + attrs[:, 1]
    return Conditions(CONDITIONS_NAMES, values, tuple(int(i) for i in np.flatnonzero(np.isin(pair, held))))


def _inside(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Whether the points (dx, dy) from each object's centre (image y grows downwards) are inside a `shape` of
    size r (broadcast per image)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == 0:  # circle
        return dx * dx + dy * dy < r * r
    if shape == 1:  # square
        return np.maximum(ax, ay) < 0.82 * r
    if shape == 2:  # triangle, apex down
        return (dy < 0.6 * r) & (2 * ax < r - dy) & (dy > -r)
    if shape == 3:  # diamond
        return ax + ay < 1.12 * r
    return ((ax < 0.32 * r) & (ay < r)) | ((ay < 0.32 * r) & (ax < r))  # cross


def draw(attrs: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images (N, side, side, 3) of the objects `attrs` (N, 4): shape, colour, size, position."""
    n = len(attrs)
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    hi = side * _SUPERSAMPLE
    grid = (np.arange(hi) + 0.5) / _SUPERSAMPLE  # sub-pixel centres, in pixels
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    for start in range(0, n, _CHUNK):
        a = attrs[start:start + _CHUNK]
        m = len(a)
        # per-image draws, in a fixed order: size, centre, brightness, background
        radius = side * np.where(a[:, 2] == 1, 0.22, 0.13) * rng.uniform(0.92, 1.08, m)
        row, col = a[:, 3] // 3, a[:, 3] % 3
        cy = side * (0.25 + 0.25 * row) + rng.uniform(-0.05, 0.05, m) * side
        cx = side * (0.25 + 0.25 * col) + rng.uniform(-0.05, 0.05, m) * side
        colour = palette[a[:, 1]] * rng.uniform(0.8, 1.0, (m, 1))  # (m, 3)
        background = rng.uniform(12, 36, (m, 1, 1, 1)) + rng.normal(0, 4, (m, side, side, 1))  # dark, textured
        dy = (grid[None, :, None] - cy[:, None, None]).astype(np.float32)  # (m, hi, 1)
        dx = (grid[None, None, :] - cx[:, None, None]).astype(np.float32)  # (m, 1, hi)
        r = radius[:, None, None].astype(np.float32)
        inside = np.zeros((m, hi, hi), dtype=bool)
        for k in np.unique(a[:, 0]):
            sel = a[:, 0] == k
            inside[sel] = _inside(int(k), dx[sel], dy[sel], r[sel])
        alpha = inside.reshape(m, side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(axis=(2, 4))[..., None]  # (m, s, s, 1)
        img = background * (1 - alpha) + colour[:, None, None, :] * alpha
        out[start:start + m] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=4)
def generate(num_images: int, eval_fraction: float, side: int, seed: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Conditions]:
    """(train images, train class ids, held-out images, held-out class ids, conditions). The training split
    never shows the held-out (shape, colour) pairs; the held-out split draws from every combination."""
    cond = conditions()
    rng = np.random.default_rng([seed, side])
    n_eval = max(1, int(round(num_images * eval_fraction)))
    allowed = np.setdiff1d(np.arange(cond.num_classes), np.array(cond.heldout))
    train_ids = rng.choice(allowed, num_images - n_eval)
    eval_ids = rng.integers(0, cond.num_classes, n_eval)
    table = cond.class_attrs()
    train = draw(table[train_ids], side, rng)
    held = draw(table[eval_ids], side, rng)
    for a in (train, held, train_ids, eval_ids):
        a.setflags(write=False)  # shared by the cache: nobody may change them
    return train, train_ids, held, eval_ids, cond
