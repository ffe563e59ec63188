"""A tokenizer from the run's `tokenizer` section and the dataset's image shape."""
from __future__ import annotations

from isynth.config import TokenizerConfig
from isynth.tokenizers.base import Tokenizer
from isynth.tokenizers.fixed import GreyLevels, Patches


def build_tokenizer(cfg: TokenizerConfig, image_shape: tuple[int, int, int]) -> Tokenizer:
    if cfg.kind == "grey":
        return GreyLevels(image_shape, cfg.levels)
    return Patches(image_shape, cfg.patch_size)
