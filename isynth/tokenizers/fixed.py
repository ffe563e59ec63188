"""Fixed tokenizers, with nothing to learn: grey levels (discrete) and pixel patches (continuous).

Both are exact on their own outputs (decode(encode(x)) == x for images the tokenizer can represent), which
the tests check, so generation quality is never limited by the tokenizer on the default data.
"""
from __future__ import annotations

import torch
from torch import Tensor

from isynth.errors import IsynthError
from isynth.tokenizers.base import Tokenizer


class GreyLevels(Tokenizer):
    """One token per pixel and channel: id = round(u * (L-1) / 255). Lossless for digits with L = 17."""

    discrete = True
    token_dim = 1

    def __init__(self, image_shape: tuple[int, int, int], levels: int):
        h, w, c = image_shape
        self.image_shape = image_shape
        self.vocab_size = levels
        self.grid = (h, w * c)  # channels interleaved along the row, raster order = NHWC memory order

    def encode(self, images: Tensor) -> Tensor:
        b = images.shape[0]
        ids = torch.round(images.to(torch.float32) * (self.vocab_size - 1) / 255.0).long()
        return ids.reshape(b, -1)  # (B, H*W*C)

    def decode(self, tokens: Tensor) -> Tensor:
        vals = torch.round(tokens.clamp(0, self.vocab_size - 1).float() * 255.0 / (self.vocab_size - 1))
        return vals.to(torch.uint8).reshape(tokens.shape[0], *self.image_shape)  # (B, H, W, C)


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
