"""The tokens the trainer draws its batches from: the training images through the run's tokenizer.

Small datasets are encoded once, in memory (with `data.flip`, their mirror images too, as MAR caches the
latents of both). A memory-mapped dataset (an image folder) is encoded a batch at a time as training asks for
it, so it never has to fit in memory. Latents cached by `isynth tokenize` are read instead of encoding; where
the cache holds a VAE's means and standard deviations, each draw samples a fresh latent (MAR).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from isynth.tokenizers.base import Tokenizer

ENCODE_CHUNK = 2048  # images encoded at once (bounds the memory of a learned encoder's activations)


def encode_all(tokenizer: Tokenizer, images: np.ndarray, flip: bool = False) -> Tensor:
    """Tokens of every image (then of every mirrored image with `flip`), encoded in chunks."""
    parts = []
    for mirrored in (False, True) if flip else (False,):
        for i in range(0, len(images), ENCODE_CHUNK):
            chunk = torch.from_numpy(np.array(images[i:i + ENCODE_CHUNK]))  # (B, H, W, C); a writable copy
            parts.append(tokenizer.encode(chunk.flip(2) if mirrored else chunk).cpu())
    return torch.cat(parts)


class EncodedOnDemand:
    """Tokens of a memory-mapped image array, encoded per batch: `source[idx]` reads the rows idx (index
    n + i is the mirror image of row i with `flip`) and encodes them on the current device."""

    def __init__(self, images: np.ndarray, tokenizer: Tokenizer, flip: bool):
        self.images, self.tokenizer, self.flip = images, tokenizer, flip
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.images) * (2 if self.flip else 1)

    def to(self, device) -> EncodedOnDemand:
        self.device = torch.device(device)
        return self

    def __getitem__(self, idx: Tensor) -> Tensor:
        rows = idx.cpu().numpy()
        n = len(self.images)
        batch = torch.from_numpy(np.stack([self.images[i % n] for i in rows]))  # (B, H, W, C)
        mirrored = torch.from_numpy(rows >= n)
        batch = torch.where(mirrored[:, None, None, None], batch.flip(2), batch)
        return self.tokenizer.encode(batch.to(self.device))


class SampledLatents:
    """Cached VAE moments (N, T, D) twice: every draw is mean + std * noise from the global generator."""

    def __init__(self, mean: Tensor, std: Tensor):
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.mean)

    def to(self, device) -> SampledLatents:
        return SampledLatents(self.mean.to(device), self.std.to(device))

    def __getitem__(self, idx: Tensor) -> Tensor:
        mean = self.mean[idx]
        return mean + self.std[idx] * torch.randn_like(mean)


def training_tokens(tokenizer: Tokenizer, images: np.ndarray, labels: np.ndarray, flip: bool
                    ) -> tuple[Tensor | EncodedOnDemand, Tensor]:
    """(inputs the trainer indexes by batch, labels): in memory, or encoded per batch for memory maps."""
    labels_t = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: the dataset's arrays are read-only
    if flip:
        labels_t = torch.cat([labels_t, labels_t])
    if isinstance(images, np.memmap):
        return EncodedOnDemand(images, tokenizer, flip), labels_t
    return encode_all(tokenizer, images, flip), labels_t
