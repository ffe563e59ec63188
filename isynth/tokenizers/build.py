"""A tokenizer from the run's `tokenizer` section and the dataset's image shape."""
from __future__ import annotations

from isynth.config import TokenizerConfig
from isynth.tokenizers.base import Tokenizer
from isynth.tokenizers.fixed import GreyLevels, Patches
from isynth.tokenizers.learned import load_learned, load_vae


def build_tokenizer(cfg: TokenizerConfig, image_shape: tuple[int, int, int]) -> Tokenizer:
    """grey and patch are built here; vq, fsq, lfq and kl are read from an `isynth tokenizer train` directory
    and vae from a diffusers AutoencoderKL folder (`tokenizer.path`), on the CPU in eval mode."""
    if cfg.kind == "grey":
        return GreyLevels(image_shape, cfg.levels)
    if cfg.kind == "patch":
        return Patches(image_shape, cfg.patch_size)
    if cfg.kind == "vae":
        return load_vae(cfg.path, image_shape, cfg.patch_size)
    return load_learned(cfg.path, image_shape, cfg.patch_size, kind=cfg.kind)
