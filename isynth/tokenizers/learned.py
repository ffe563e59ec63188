"""Learned tokenizers: a trained autoencoder behind the `Tokenizer` interface, and loading one from disk.

Discrete kinds quantise the encoder's latent grid (one id per latent cell, raster order) with
vector-quantize-pytorch's quantisers:

- `vq`: nearest code of a learned codebook, updated by exponential moving averages of the vectors assigned
  to each code (VQ-VAE, van den Oord et al. 2017, appendix; Razavi et al. 2019), with k-means
  initialisation and dead-code replacement, as the library recommends for codebook usage; commitment loss.
- `fsq`: each latent channel bounded and rounded to a few levels, the codebook is their product (FSQ,
  Mentzer et al. 2023); no codebook, no auxiliary loss.
- `lfq`: the sign of each of log2(K) channels (lookup-free quantisation, MAGVIT-v2, Yu et al. 2023) with
  MAGVIT-v2's entropy penalty (confident per-token codes, a uniform batch marginal).

Continuous kinds are KL-regularised VAEs (LDM, Rombach et al. 2022), diffusers' `AutoencoderKL`: `kl` trained
by `isynth tokenizer train`, `vae` any pretrained diffusers folder. `encode` returns the posterior *mean*
(deterministic, so a dataset encodes to the same tokens every time) times the scaling factor that gives the
latents roughly unit variance (LDM sec. 4.3.2: Stable Diffusion's 0.18215), and `encode_moments` the mean and
standard deviation, from which a training set can draw fresh samples (as MAR caches its VAE's moments).
`tokenizer.patch_size` p groups p x p latent cells into one token of p*p*C values, as `Patches` does pixels.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from isynth.checkpoint import load_weights
from isynth.errors import IsynthError
from isynth.files import read_json, sha256_file
from isynth.flops import matmul_flops
from isynth.overrides import merge
from isynth.tokenizers.base import Tokenizer
from isynth.tokenizers.nets import Decoder, Encoder, NetConfig, check_kl_config, kl_config, kl_flops
from isynth.tokenizers.store import MANIFEST, read_manifest

QUANTISED = ("vq", "fsq", "lfq")
WEIGHTS = "weights.safetensors"
CHUNK = 256  # images through the network at once: bounds activation memory whatever the caller passes


def z_channels(kind: str, cfg: NetConfig) -> int:
    """Channels of the latent a quantiser reads (no projections: the encoder outputs them directly)."""
    return {"vq": cfg.codebook_dim, "fsq": len(cfg.fsq_levels), "lfq": int(math.log2(cfg.codebook_size)),
            "kl": cfg.latent_channels}[kind]


def vocab_size(kind: str, cfg: NetConfig) -> int:
    return math.prod(cfg.fsq_levels) if kind == "fsq" else cfg.codebook_size


def check_image_shape(image_shape: tuple[int, int, int], f: int, what: str) -> tuple[int, int]:
    """The latent grid (h/f, w/f), or one error when f does not divide the image size."""
    h, w, _ = image_shape
    if h % f or w % f:
        raise IsynthError(f"{what}: downsampling factor {f} does not divide the image size {h}x{w}")
    return h // f, w // f


class QuantisedAutoencoder(nn.Module):
    """Encoder -> quantiser -> decoder of the `vq`, `fsq` and `lfq` kinds. `forward` is the training pass:
    (reconstruction in [-1, 1] (B, C, H, W), the quantiser's weighted auxiliary loss, ids (B, N))."""

    def __init__(self, kind: str, cfg: NetConfig, image_shape: tuple[int, int, int], commit: float = 0.25,
                 entropy: float = 0.1):
        super().__init__()
        from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

        self.kind, self.image_shape = kind, image_shape
        self.grid = check_image_shape(image_shape, cfg.downsample, "model.downsample")
        d = z_channels(kind, cfg)
        self.encoder, self.decoder = Encoder(cfg, image_shape[2], d), Decoder(cfg, image_shape[2], d)
        if kind == "vq":
            self.quantizer = VectorQuantize(dim=d, codebook_size=cfg.codebook_size, decay=cfg.vq_decay,
                                            commitment_weight=commit, kmeans_init=True, threshold_ema_dead_code=2)
        elif kind == "fsq":
            self.quantizer = FSQ(levels=list(cfg.fsq_levels))
        else:  # MAGVIT-v2's entropy penalty (diversity_gamma 1) and a commitment term
            self.quantizer = LFQ(dim=d, codebook_size=cfg.codebook_size, entropy_loss_weight=entropy,
                                 commitment_loss_weight=commit, diversity_gamma=1.0)
        self.vocab_size = vocab_size(kind, cfg)

    def latent(self, x: Tensor) -> Tensor:
        z = self.encoder(x)  # (B, D, h, w)
        return z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])  # (B, h*w, D), raster order

    def quantise(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(quantised vectors (B, N, D), ids (B, N) int64, weighted auxiliary loss)."""
        out = self.quantizer(z)
        zq, ids = out[0], out[1]
        aux = out[2] if self.kind != "fsq" else zq.new_zeros(())
        return zq, ids.long(), aux

    def codes(self, ids: Tensor) -> Tensor:
        """ids (B, N) -> code vectors (B, N, D)."""
        ids = ids.clamp(0, self.vocab_size - 1)
        if self.kind == "vq":
            return self.quantizer.get_output_from_indices(ids)
        return self.quantizer.indices_to_codes(ids)

    def reconstruct(self, zq: Tensor) -> Tensor:
        b, (h, w) = zq.shape[0], self.grid
        return self.decoder(zq.transpose(1, 2).reshape(b, -1, h, w))  # decode (B, D, h, w)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zq, ids, aux = self.quantise(self.latent(x))
        return self.reconstruct(zq), aux, ids


class KLAutoencoder(nn.Module):
    """diffusers' AutoencoderKL with the training pass of LDM's KL autoencoder: a sample of the posterior is
    decoded, and the KL to N(0, I), summed over the latent and divided by the image's pixel values (the
    reconstruction loss is a mean over them), is weighted by `kl_weight` (LDM: 1e-6)."""

    def __init__(self, vae: nn.Module, image_shape: tuple[int, int, int], kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.image_shape, self.kl_weight = vae, image_shape, kl_weight
        self.grid = check_image_shape(image_shape, 2 ** (len(vae.config.block_out_channels) - 1), "the VAE")

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std  # (B, L, h, w) each

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample()).sample  # (B, C, H, W)
        kl = dist.kl().mean() / math.prod(self.image_shape)  # dist.kl(): (B,) summed over the latent
        return recon, self.kl_weight * kl, None


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    return ((x.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class LearnedTokenizer(Tokenizer):
    """A trained autoencoder as a tokenizer. The quantised kinds are this class; the VAEs `VAETokenizer`.
    The network stays on the device `.to(device)` put it, in the mode it is in (the loaders put it in eval mode);
    tokens and images come back on the caller's device."""

    def __init__(self, kind: str, net: nn.Module, image_shape: tuple[int, int, int], flops: tuple[int, int]):
        self.kind, self.net, self.image_shape, self._flops = kind, net, image_shape, flops
        self.discrete = kind in QUANTISED
        if self.discrete:
            self.grid, self.vocab_size, self.token_dim = net.grid, net.vocab_size, 1

    def to(self, device) -> LearnedTokenizer:
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def encode_flops(self) -> int:
        return self._flops[0]

    def decode_flops(self) -> int:
        return self._flops[1]

    def _check_images(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != tuple(self.image_shape):
            raise IsynthError(f"{self.kind} tokenizer encodes uint8 images [B, {', '.join(map(str, self.image_shape))}]"
                              f", got {images.dtype} {list(images.shape)}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self._check_images(images)
        out = [self._encode(to_float(c.to(self.device))) for c in images.split(CHUNK)]
        return torch.cat(out).to(images.device)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        out = [to_uint8(self._decode(c.to(self.device))) for c in tokens.split(CHUNK)]
        return torch.cat(out).to(tokens.device)  # (B, H, W, C)

    def _encode(self, x: Tensor) -> Tensor:
        return self.net.quantise(self.net.latent(x))[1]  # ids (B, N)

    def _decode(self, ids: Tensor) -> Tensor:
        return self.net.reconstruct(self.net.codes(ids.long()))


class VAETokenizer(LearnedTokenizer):
    """`kl` and `vae`: scaled posterior means as vectors (B, N, p*p*L); `decode` inverts the scaling, the
    shift (SD3-style VAEs have one) and the grouping of cells."""

    def __init__(self, kind: str, net: KLAutoencoder, image_shape: tuple[int, int, int], patch_size: int,
                 scaling_factor: float, shift_factor: float = 0.0):
        cfg = net.vae.config
        super().__init__(kind, net, image_shape, kl_flops(cfg, image_shape[0], image_shape[1]))
        h, w = net.grid
        if h % patch_size or w % patch_size:
            raise IsynthError(f"tokenizer.patch_size={patch_size} does not divide the {kind} latent grid {h}x{w}")
        self.p, self.latent_channels = patch_size, cfg.latent_channels
        self.scale, self.shift = float(scaling_factor), float(shift_factor)
        self.grid, self.vocab_size = (h // patch_size, w // patch_size), 0
        self.token_dim = patch_size * patch_size * cfg.latent_channels

    def _patches(self, z: Tensor) -> Tensor:
        b, c, h, w, p = *z.shape, self.p
        z = z.permute(0, 2, 3, 1).reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
        return z.reshape(b, self.seq_len, self.token_dim)  # (B, N, D)

    def _cells(self, tokens: Tensor) -> Tensor:
        (h, w), p, c = self.grid, self.p, self.latent_channels
        z = tokens.reshape(-1, h, w, p, p, c).permute(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, C)
        return z.reshape(-1, h * p, w * p, c).permute(0, 3, 1, 2)  # (B, C, h*p, w*p)

    def _encode(self, x: Tensor) -> Tensor:
        mean, _ = self.net.moments(x)
        return self._patches((mean - self.shift) * self.scale)

    def _decode(self, tokens: Tensor) -> Tensor:
        return self.net.vae.decode(self._cells(tokens.float()) / self.scale + self.shift).sample

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) tokens (B, N, D) each, scaled like `encode`: a draw is mean + std * noise."""
        self._check_images(images)
        means, stds = [], []
        for c in images.split(CHUNK):
            mean, std = self.net.moments(to_float(c.to(self.device)))
            means.append(self._patches((mean - self.shift) * self.scale))
            stds.append(self._patches(std * self.scale))
        return torch.cat(means).to(images.device), torch.cat(stds).to(images.device)


# --- building and loading ------------------------------------------------------------------------------

def build_net(kind: str, cfg: NetConfig, image_shape: tuple[int, int, int], commit: float = 0.25,
              entropy: float = 0.1, kl_weight: float = 1e-6) -> nn.Module:
    """A freshly initialised network of a learned kind (the loss weights matter for training only)."""
    if kind == "kl":
        from diffusers import AutoencoderKL

        return KLAutoencoder(AutoencoderKL(**kl_config(cfg, image_shape)), image_shape, kl_weight)
    return QuantisedAutoencoder(kind, cfg, image_shape, commit, entropy)


def tokenizer_for(kind: str, net: nn.Module, cfg: NetConfig, image_shape: tuple[int, int, int], patch_size: int = 1,
                  scaling_factor: float = 1.0) -> LearnedTokenizer:
    """The tokenizer around a trained network (the trainer's EMA weights, or weights read from disk)."""
    if kind == "kl":
        return VAETokenizer(kind, net, image_shape, patch_size, scaling_factor)
    if patch_size != 1:
        raise IsynthError(f"tokenizer.patch_size={patch_size} groups the latent cells of kl and vae tokenizers; "
                          f"{kind} gives one id per latent cell (set tokenizer.patch_size=1)")
    h, w = net.grid
    flops = net.encoder.flops(*image_shape[:2]), net.decoder.flops(h, w)
    if kind == "vq":  # distances of every latent vector to every code: (N, D) x (D, K)
        flops = flops[0] + matmul_flops(h * w, cfg.codebook_dim, cfg.codebook_size), flops[1]
    return LearnedTokenizer(kind, net, image_shape, flops)


def load_learned(path: str | Path, image_shape: tuple[int, int, int], patch_size: int = 1,
                 kind: str | None = None) -> LearnedTokenizer:
    """The tokenizer of an `isynth tokenizer train` directory (EMA weights, eval mode, on the CPU), refusing
    one of another kind than `kind`, one trained for other images, and missing or corrupt weights."""
    path = Path(path)
    manifest = read_manifest(path)
    if kind is not None and manifest["kind"] != kind:
        raise IsynthError(f"{path} holds a {manifest['kind']} tokenizer, not tokenizer.kind={kind}")
    trained_for = tuple(manifest.get("image_shape", ()))
    if trained_for != tuple(image_shape):
        raise IsynthError(f"{path}: tokenizer trained on {list(trained_for)} images; this dataset's are "
                          f"{list(image_shape)}")
    try:
        cfg = merge(NetConfig(), manifest["config"]["model"], "model.")
        file, digest = path / manifest["weights"], manifest["weights_sha256"]
    except (KeyError, TypeError):
        raise IsynthError(f"{path}: incomplete tokenizer manifest (config.model, weights, weights_sha256)") from None
    if not file.is_file():
        raise IsynthError(f"{path}: missing tokenizer weights {file.name}")
    if sha256_file(file) != digest:
        raise IsynthError(f"{file}: corrupt tokenizer weights (SHA-256 differs from the manifest's)")
    try:
        state = load_file(file)
    except (SafetensorError, OSError) as e:
        raise IsynthError(f"{file}: unreadable tokenizer weights ({type(e).__name__})") from None
    net = build_net(manifest["kind"], cfg, tuple(image_shape))
    load_weights(net, state, file)
    net.eval().requires_grad_(False)
    return tokenizer_for(manifest["kind"], net, cfg, tuple(image_shape), patch_size,
                         float(manifest.get("scaling_factor") or 1.0))


def load_vae(path: str | Path, image_shape: tuple[int, int, int], patch_size: int = 1) -> VAETokenizer:
    """A pretrained diffusers AutoencoderKL folder from local disk (never a hub name: nothing is downloaded;
    safetensors weights only, never a pickled .bin), scaled by its `config.scaling_factor` (and shifted by
    `shift_factor` where it has one)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        raise IsynthError(f"{path} is an isynth tokenizer directory, not a diffusers folder: use "
                          f"tokenizer.kind={read_manifest(path)['kind']}")
    if not (path / "config.json").is_file():
        raise IsynthError(f"{path} is not a diffusers AutoencoderKL folder (no config.json); tokenizer.kind=vae "
                          "reads a local folder saved with save_pretrained")
    config = read_json(path / "config.json", "diffusers config")
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise IsynthError(f"{path}/config.json: not an AutoencoderKL config")
    check_kl_config(config, str(path))
    if config.get("in_channels", 3) != image_shape[2]:
        raise IsynthError(f"{path}: the VAE reads {config.get('in_channels', 3)}-channel images; this dataset's "
                          f"have {image_shape[2]}")
    check_image_shape(image_shape, 2 ** (len(config["block_out_channels"]) - 1), str(path))
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                            low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError, ValueError, RuntimeError, safetensors errors ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise IsynthError(f"{path}: cannot load the AutoencoderKL ({type(e).__name__}: {first[:200]})") from None
    vae = vae.float().eval().requires_grad_(False)
    return VAETokenizer("vae", KLAutoencoder(vae, tuple(image_shape)), tuple(image_shape), patch_size,
                        vae.config.scaling_factor, vae.config.shift_factor or 0.0)

