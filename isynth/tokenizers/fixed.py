"""Fixed tokenizers, with nothing to learn: grey levels (discrete) and pixel patches (continuous).

Both are exact on their own outputs (decode(encode(x)) == x for images the tokenizer can represent), which
the tests check, so generation quality is never limited by the tokenizer on the default data.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from isynth.errors import IsynthError
from isynth.tokenizers.base import Tokenizer


class GreyLevels(Tokenizer):
    """One token per pixel and channel: id = round(u * (L-1) / 255). Lossless for digits with L = 17, and for
    any uint8 data with L = 256."""

    discrete = True
    token_dim = 1

    def __init__(self, image_shape: tuple[int, int, int], levels: int):
        h, w, c = image_shape
        self.image_shape = image_shape
        self.vocab_size = levels
        self.grid = (h, w * c)  # channels interleaved along the row, raster order = NHWC memory order

    def _ids(self, values: Tensor) -> Tensor:
        return torch.round(values.to(torch.float32) * (self.vocab_size - 1) / 255.0).long()

    def _values(self, ids: Tensor) -> Tensor:
        vals = torch.round(ids.clamp(0, self.vocab_size - 1).float() * 255.0 / (self.vocab_size - 1))
        return vals.to(torch.uint8)

    def encode(self, images: Tensor) -> Tensor:
        return self._ids(images).reshape(images.shape[0], -1)  # (B, H*W*C)

    def decode(self, tokens: Tensor) -> Tensor:
        return self._values(tokens).reshape(tokens.shape[0], *self.image_shape)  # (B, H, W, C)

    def check_data(self, images) -> None:
        """Refuse data that L grey levels would quantise (an RGB photograph at 17 levels): every pixel value
        present (in the first 10,000 images) must survive encode then decode."""
        present = np.zeros(256, dtype=bool)
        for i in range(0, min(len(images), 10_000), 1000):
            present |= np.bincount(np.asarray(images[i:i + 1000]).ravel(), minlength=256) > 0
        values = torch.from_numpy(np.flatnonzero(present)).to(torch.uint8)
        lost = values[self._values(self._ids(values)) != values]
        if len(lost):
            raise IsynthError(f"tokenizer.kind=grey with {self.vocab_size} levels would quantise this data's pixel "
                              f"values ({len(lost)} of the {len(values)} present change, e.g. {int(lost[0])}): set "
                              "tokenizer.levels=256 for lossless ids, or train a tokenizer (isynth tokenizer train)")


class Patches(Tokenizer):
    """Continuous tokens: non-overlapping p x p patches scaled to [-1, 1], D = p*p*C (MAR/DiT-style)."""

    discrete = False
    vocab_size = 0

    def __init__(self, image_shape: tuple[int, int, int], patch_size: int):
        h, w, c = image_shape
        if h % patch_size or w % patch_size:
            raise IsynthError(f"tokenizer.patch_size={patch_size} does not divide the image size {h}x{w}")
        self.image_shape, self.p = image_shape, patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.token_dim = patch_size * patch_size * c

    def encode(self, images: Tensor) -> Tensor:
        b, (h, w, c), p = images.shape[0], self.image_shape, self.p
        x = images.to(torch.float32) / 127.5 - 1.0
        x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
        return x.reshape(b, self.seq_len, self.token_dim)  # (B, N, D)

    def decode(self, tokens: Tensor) -> Tensor:
        b, (h, w, c), p = tokens.shape[0], self.image_shape, self.p
        x = tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, C)
        x = ((x.reshape(b, h, w, c) + 1.0) * 127.5).round().clamp(0, 255)
        return x.to(torch.uint8)  # (B, H, W, C)


class ShapeOnly(Tokenizer):
    """A token grid of given size and codebook with no image mapping: FLOPs of paper-size settings
    (e.g. RAR's 256 MaskGIT-VQ tokens from 1024 codes) without their tokenizer weights."""

    def __init__(self, seq_len: int, vocab_size: int, token_dim: int = 1, discrete: bool = True):
        side = round(seq_len ** 0.5)
        grid = (side, side) if side * side == seq_len else (1, seq_len)  # square where it can be (2-D positions)
        self.grid, self.vocab_size, self.token_dim, self.discrete = grid, vocab_size, token_dim, discrete
