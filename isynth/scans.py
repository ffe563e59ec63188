"""Fixed scan orders of an h x w token grid, the six of RAR's Table 3 (Yu et al. 2024; the orders Esser et al.
2021 compared for taming transformers): each is a permutation `order` (N,) of the raster positions, order[i]
being the position generated at step i.

- raster: row by row, left to right.
- spiral-in: clockwise from the top-left corner along the border, inwards to the centre.
- spiral-out: the same path reversed, from the centre outwards.
- z-curve: Morton order, the bits of row and column interleaved (any grid: positions sorted by their code).
- subsample: the four stride-2 sub-grids one after the other, (even, even), (even, odd), (odd, even),
  (odd, odd) rows and columns, each in raster order, so a coarse image comes first.
- alternate: row by row, alternating direction (left to right, then right to left).
"""
from __future__ import annotations

import torch
from torch import Tensor

SCANS = ("raster", "spiral-in", "spiral-out", "z-curve", "subsample", "alternate")


def _spiral_in(h: int, w: int) -> list[int]:
    top, bottom, left, right, out = 0, h - 1, 0, w - 1, []
    while top <= bottom and left <= right:
        out += [top * w + c for c in range(left, right + 1)]
        out += [r * w + right for r in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * w + c for c in range(right - 1, left - 1, -1)]
        if left < right:
            out += [r * w + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


def _morton(r: int, c: int) -> int:
    code = 0
    for bit in range(16):
        code |= ((r >> bit) & 1) << (2 * bit + 1) | ((c >> bit) & 1) << (2 * bit)
    return code


def scan_order(name: str, grid: tuple[int, int]) -> Tensor:
    """The permutation (h * w,) of raster positions that scan `name` visits, in visiting order."""
    h, w = grid
    cells = [(r, c) for r in range(h) for c in range(w)]
    if name == "raster":
        order = list(range(h * w))
    elif name == "spiral-in":
        order = _spiral_in(h, w)
    elif name == "spiral-out":
        order = _spiral_in(h, w)[::-1]
    elif name == "z-curve":
        order = sorted(range(h * w), key=lambda p: _morton(*cells[p]))
    elif name == "subsample":
        order = [r * w + c for dr in (0, 1) for dc in (0, 1) for r in range(dr, h, 2) for c in range(dc, w, 2)]
    elif name == "alternate":
        order = [r * w + (c if r % 2 == 0 else w - 1 - c) for r in range(h) for c in range(w)]
    else:
        raise ValueError(f"unknown scan order {name!r}; choose one of {', '.join(SCANS)}")
    return torch.tensor(order, dtype=torch.long)
