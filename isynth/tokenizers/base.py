"""The one interface of every tokenizer: uint8 images [B, H, W, C] <-> tokens on an h x w grid.

Discrete tokenizers return int64 ids [B, N]; continuous ones return float vectors [B, N, D]. Paradigms see
only this interface; the tokenizer's own compute (a learned encoder and decoder) is accounted separately
from the generator's (`encode_flops` per training image, `decode_flops` per sample).
"""
from __future__ import annotations

from torch import Tensor


class Tokenizer:
    discrete: bool
    vocab_size: int          # discrete: number of ids; continuous: 0
    token_dim: int           # continuous: vector size; discrete: 1
    grid: tuple[int, int]    # (h, w) token grid
    image_shape: tuple[int, int, int]  # (H, W, C) of the images it encodes and decodes

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def to(self, device) -> Tokenizer:
        """Move a learned tokenizer's weights; fixed tokenizers have none."""
        return self

    def check_data(self, images) -> None:
        """Raise IsynthError if encoding these uint8 images would silently lose information the user did
        not ask to lose (fixed tokenizers); learned ones are lossy by design and say so in their metrics."""

    def encode_flops(self) -> int:
        """Matmul / convolution FLOPs to encode one image (0 for fixed tokenizers)."""
        return 0

    def decode_flops(self) -> int:
        """Matmul / convolution FLOPs to decode one image (0 for fixed tokenizers)."""
        return 0
