"""The convolutional autoencoders of the learned tokenizers, their settings and their analytic FLOPs.

`Encoder` / `Decoder` are the VQGAN-style networks (Esser et al. 2021, after the VQ-VAE of van den Oord et
al. 2017) of the quantised kinds: a 3x3 stem, residual blocks of GroupNorm -> SiLU -> 3x3 conv at each
resolution level, a stride-2 conv between levels, and a decoder that mirrors it with nearest-neighbour
upsampling followed by a 3x3 conv. The `kl` kind uses diffusers' `AutoencoderKL` (the LDM autoencoder of
Rombach et al. 2022) configured from the same settings (`kl_config`); `kl_flops` counts it from its config,
so that a pretrained diffusers VAE (`tokenizer.kind=vae`) is counted by the same formula.

FLOPs count convolutions and matmuls only (2 k_h k_w C_in C_out H_out W_out per conv, 2 m k n per matmul),
as `isynth.flops.counting()` does; norms and activations are free. The tests check both counts against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from isynth.config import check
from isynth.errors import IsynthError
from isynth.flops import matmul_flops


def int_list(text: str, name: str) -> tuple[int, ...]:
    """"8,5,5,5" -> (8, 5, 5, 5); list-valued settings are comma-separated text so that overrides and the
    manifest's JSON set them like any other field."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise IsynthError(f"{name}={text!r} must be comma-separated integers, e.g. 1,2") from None
    check(len(values) > 0 and min(values) > 0, f"{name}={text!r} must be positive integers")
    return values


@dataclass(frozen=True)
class NetConfig:
    """The autoencoder: the `model.` section of `isynth tokenizer train`."""

    downsample: int = 4           # f: image side / token-grid side (a power of 2; 32x32 -> 8x8 tokens at f=4)
    width: int = 32               # channels at full resolution
    mult: str = "1,2"             # channel multiplier of each resolution level, the last repeated for deeper ones
    blocks: int = 1               # residual blocks per level (AutoencoderKL: layers_per_block)
    norm_groups: int = 8          # GroupNorm groups; must divide every level's width
    codebook_size: int = 1024     # vq: codes; lfq: codes, a power of 2 (one bit per latent channel)
    codebook_dim: int = 8         # vq: size of a code vector (the encoder's output channels)
    vq_decay: float = 0.8         # vq: EMA decay of the codebook (vector-quantize-pytorch's default)
    levels: str = "8,5,5,5"       # fsq: levels per latent channel; codebook = their product (FSQ Table 1)
    latent_channels: int = 4      # kl: latent channels (LDM's KL-f4 / f8 autoencoders: 3 or 4)
    attention: bool = False       # kl: self-attention in AutoencoderKL's mid blocks (LDM: on; costly at 2 cores)

    def __post_init__(self):
        check(self.downsample >= 1 and self.downsample & (self.downsample - 1) == 0 and self.downsample <= 64,
              f"model.downsample={self.downsample} must be a power of 2 in [1, 64]")
        check(self.width > 0 and self.blocks > 0, "model.width and model.blocks must be > 0")
        mult = int_list(self.mult, "model.mult")
        check(len(mult) <= self.num_levels, f"model.mult={self.mult!r} has {len(mult)} levels; downsample "
              f"{self.downsample} has {self.num_levels}")
        check(self.norm_groups > 0 and all(c % self.norm_groups == 0 for c in self.channels),
              f"model.norm_groups={self.norm_groups} must divide every level's width {list(self.channels)}")
        check(self.codebook_size >= 2, "model.codebook_size must be >= 2")
        check(self.codebook_dim > 0 and self.latent_channels > 0, "model.codebook_dim, latent_channels must be > 0")
        check(0 < self.vq_decay < 1, "model.vq_decay must be in (0, 1)")
        # vector-quantize-pytorch's FSQ needs >= 3 levels per channel outside its symmetry-preserving variant
        check(min(int_list(self.levels, "model.levels")) >= 3, f"model.levels={self.levels!r}: each must be >= 3")

    @property
    def num_levels(self) -> int:
        return int(math.log2(self.downsample)) + 1

    @property
    def channels(self) -> tuple[int, ...]:
        mult = int_list(self.mult, "model.mult")
        return tuple(self.width * mult[min(i, len(mult) - 1)] for i in range(self.num_levels))

    @property
    def fsq_levels(self) -> tuple[int, ...]:
        return int_list(self.levels, "model.levels")


def conv_flops(conv: nn.Conv2d, h: int, w: int) -> int:
    """Forward FLOPs of `conv` producing an h x w map: 2 k_h k_w (C_in / groups) C_out h w."""
    kh, kw = conv.kernel_size
    return 2 * kh * kw * (conv.in_channels // conv.groups) * conv.out_channels * h * w


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the input (through a 1x1 conv where the width changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

    def flops(self, h: int, w: int) -> int:
        skip = conv_flops(self.skip, h, w) if isinstance(self.skip, nn.Conv2d) else 0
        return conv_flops(self.conv1, h, w) + conv_flops(self.conv2, h, w) + skip


def _levels(channels, blocks: int, groups: int, resample_name: str, resample) -> nn.ModuleList:
    """One level per width: `blocks` residual blocks, then `resample(width)` stored as `resample_name` (down- or
    upsampling) on every level but the last."""
    levels, prev = nn.ModuleList(), channels[0]
    for i, c in enumerate(channels):
        level = nn.Module()
        level.blocks = nn.ModuleList([ResBlock(prev if j == 0 else c, c, groups) for j in range(blocks)])
        setattr(level, resample_name, resample(c) if i < len(channels) - 1 else None)
        levels.append(level)
        prev = c
    return levels


class Encoder(nn.Module):
    """(B, C_img, H, W) in [-1, 1] -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: NetConfig, image_channels: int, z_channels: int):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(image_channels, ch[0], 3, padding=1)
        self.levels = _levels(ch, cfg.blocks, g, "down", lambda c: nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                x = block(x)
            if level.down is not None:
                x = level.down(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    def flops(self, h: int, w: int) -> int:
        total = conv_flops(self.conv_in, h, w)
        for level in self.levels:
            total += sum(block.flops(h, w) for block in level.blocks)
            if level.down is not None:
                h, w = h // 2, w // 2
                total += conv_flops(level.down, h, w)
        return total + conv_flops(self.conv_out, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, C_img, h*f, w*f): the encoder's mirror image."""

    def __init__(self, cfg: NetConfig, image_channels: int, z_channels: int):
        super().__init__()
        ch, g = cfg.channels[::-1], cfg.norm_groups
        self.conv_in = nn.Conv2d(z_channels, ch[0], 3, padding=1)
        self.levels = _levels(ch, cfg.blocks, g, "up", lambda c: nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        for level in self.levels:
            for block in level.blocks:
                x = block(x)
            if level.up is not None:
                x = level.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(x)))

    def flops(self, h: int, w: int) -> int:
        total = conv_flops(self.conv_in, h, w)
        for level in self.levels:
            total += sum(block.flops(h, w) for block in level.blocks)
            if level.up is not None:
                h, w = 2 * h, 2 * w
                total += conv_flops(level.up, h, w)
        return total + conv_flops(self.conv_out, h, w)


# --- diffusers' AutoencoderKL ----------------------------------------------------------------------------

ENCODER_BLOCK, DECODER_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"


def kl_config(cfg: NetConfig, image_shape: tuple[int, int, int]) -> dict:
    """AutoencoderKL's constructor arguments for the `kl` kind: one down / up block per resolution level."""
    levels = cfg.num_levels
    return {"in_channels": image_shape[2], "out_channels": image_shape[2],
            "down_block_types": [ENCODER_BLOCK] * levels, "up_block_types": [DECODER_BLOCK] * levels,
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.blocks,
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
            "sample_size": image_shape[0], "mid_block_add_attention": cfg.attention}


def check_kl_config(config: dict, source: str) -> None:
    """Refuse an AutoencoderKL config whose blocks `kl_flops` does not know (e.g. another VAE family)."""
    downs, ups = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    n = len(config.get("block_out_channels", []))
    if n == 0 or downs != [ENCODER_BLOCK] * n or ups != [DECODER_BLOCK] * n:
        raise IsynthError(f"{source}: unsupported AutoencoderKL blocks {downs} / {ups}; isynth reads VAEs built "
                          f"from {ENCODER_BLOCK} and {DECODER_BLOCK} (the Stable Diffusion family)")


def _c(k: int, c_in: int, c_out: int, hw: int) -> int:
    return 2 * k * k * c_in * c_out * hw


def _res(c_in: int, c_out: int, hw: int) -> int:  # diffusers' ResnetBlock2D without a time embedding
    return _c(3, c_in, c_out, hw) + _c(3, c_out, c_out, hw) + (_c(1, c_in, c_out, hw) if c_in != c_out else 0)


def _mid(c: int, hw: int, attention: bool) -> int:
    """UNetMidBlock2D: resnet, (single-head self-attention over the hw cells: q, k, v, out projections and
    the two attention matmuls), resnet."""
    attn = 4 * matmul_flops(hw, c, c) + 4 * hw * hw * c if attention else 0
    return 2 * _res(c, c, hw) + attn


def kl_flops(config: dict, h: int, w: int) -> tuple[int, int]:
    """(encode, decode) forward FLOPs of an AutoencoderKL with this config on one h x w image: the encoder
    and quant_conv to the latent moments; post_quant_conv and the decoder back."""
    ch, per_block = list(config["block_out_channels"]), int(config.get("layers_per_block", 1))
    lat, attention = int(config.get("latent_channels", 4)), bool(config.get("mid_block_add_attention", True))
    enc, prev = _c(3, config.get("in_channels", 3), ch[0], h * w), ch[0]
    for i, c in enumerate(ch):
        for _ in range(per_block):
            enc, prev = enc + _res(prev, c, h * w), c
        if i < len(ch) - 1:  # Downsample2D: pad (0, 1, 0, 1), 3x3 conv of stride 2
            h, w = h // 2, w // 2
            enc += _c(3, c, c, h * w)
    enc += _mid(ch[-1], h * w, attention) + _c(3, ch[-1], 2 * lat, h * w)
    enc += _c(1, 2 * lat, 2 * lat, h * w) if config.get("use_quant_conv", True) else 0
    dec = _c(1, lat, lat, h * w) if config.get("use_post_quant_conv", True) else 0
    dec += _c(3, lat, ch[-1], h * w) + _mid(ch[-1], h * w, attention)
    prev = ch[-1]
    for i, c in enumerate(reversed(ch)):
        for _ in range(per_block + 1):  # the decoder has one resnet more per level
            dec, prev = dec + _res(prev, c, h * w), c
        if i < len(ch) - 1:  # Upsample2D: nearest 2x, 3x3 conv
            h, w = 2 * h, 2 * w
            dec += _c(3, c, c, h * w)
    return enc, dec + _c(3, ch[0], config.get("out_channels", 3), h * w)
