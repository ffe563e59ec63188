"""Frozen, typed configuration: one dataclass per component; a run is their composition.

Every dataclass validates itself in `__post_init__` and raises `IsynthError` with one line naming the
field, so the command line rejects a bad value before anything is written. The paradigm-specific sections
(`method`, `sample`) are dataclasses defined next to each paradigm; settings shared by several of them are
one nested value each (`Guidance` in `isynth.guidance`, the diffusion head's sections in `isynth.diffhead`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from isynth.errors import IsynthError


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise IsynthError(msg)


def finite(x: float) -> bool:
    return math.isfinite(x)


@dataclass(frozen=True)
class ModelConfig:
    """The shared transformer backbone."""

    width: int = 128              # model dimension C
    depth: int = 4                # number of blocks
    num_heads: int = 4                      # attention heads (head dim = width / num_heads)
    mlp_ratio: float = 4.0        # MLP hidden = mlp_ratio * width
    dropout: float = 0.0          # residual / MLP dropout (RAR: 0.1)
    attn_dropout: float = 0.0     # attention-probability dropout (RAR: 0.1)
    qk_norm: bool = False         # LayerNorm on q and k per head (RAR reference)
    adaln: bool = False           # adaLN-Zero conditioning of every block on the condition vector
    # adaLN's blocks keep LayerNorm's own affine parameters too (redundant with the modulation; the RAR
    # reference has them, DiT not); without adaLN the norms always have them
    adaln_norm_affine: bool = False

    def __post_init__(self):
        check(self.width > 0 and self.depth > 0 and self.num_heads > 0, "model.width, depth, num_heads must be > 0")
        check(self.width % self.num_heads == 0,
              f"model.width={self.width} must be divisible by num_heads={self.num_heads}")
        check(self.mlp_ratio > 0 and finite(self.mlp_ratio), "model.mlp_ratio must be a finite number > 0")
        check(0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1, "model dropouts must be in [0, 1)")

    @property
    def norm_affine(self) -> bool:
        """Whether the blocks' LayerNorms have their own scale and bias."""
        return not self.adaln or self.adaln_norm_affine

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.width)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "shapes", "npz", "folder", "latents"] = "digits" # the dataset (--dataset sets it)
    path: str | None = None       # npz: the file (arr_0 uint8 NHWC, labels); folder, latents: the directory
    eval_fraction: float = 0.2    # held-out share, split by a seeded permutation
    split_seed: int = 0           # the split's seed (and shapes' generator seed)
    image_size: int | None = None  # folder and shapes: side of the square images (default 32); others: None
    num_images: int = 12_000      # shapes: images generated (training and held-out splits together)
    flip: bool = False            # also train on mirrored copies of the training images (MAR caches both)

    def __post_init__(self):
        check(0 < self.eval_fraction < 1, "data.eval_fraction must be in (0, 1)")
        check(self.image_size is None or 8 <= self.image_size <= 1024, "data.image_size must be in [8, 1024]")
        check(self.image_size is None or self.name in ("folder", "shapes"),
              f"data.image_size resizes image folders and shapes; {self.name} keeps its images' size")
        check(self.num_images >= 10, "data.num_images must be >= 10")
        check(not self.flip or self.name in ("npz", "folder"),
              f"data.flip mirrors images, which would change what {self.name}' labels say (a mirrored digit, a "
              "shape's position); it is for user data (npz, folder)")

    @property
    def side(self) -> int:
        """The image side of folder and shapes datasets."""
        return self.image_size or 32


DISCRETE_KINDS = ("grey", "vq", "fsq", "lfq")   # ids, a softmax head
LEARNED_KINDS = ("vq", "fsq", "lfq", "kl")      # trained by `isynth tokenizer train`, read from tokenizer.path


@dataclass(frozen=True)
class TokenizerConfig:
    # grey: one id per pixel and channel; patch: pixel patches as vectors; vq / fsq / lfq: codes of a learned
    # quantised autoencoder; kl: latents of a learned KL autoencoder; vae: a pretrained diffusers AutoencoderKL
    kind: Literal["grey", "patch", "vq", "fsq", "lfq", "kl", "vae"] = "grey"
    levels: int = 17              # grey: number of quantisation levels (17 is lossless for digits)
    patch_size: int = 1           # patch: pixels per side of a token; kl / vae: latent cells per side of a token
    path: str | None = None       # learned kinds: an `isynth tokenizer train` directory; vae: a diffusers folder

    def __post_init__(self):
        check(2 <= self.levels <= 256, "tokenizer.levels must be in [2, 256]")
        check(self.patch_size >= 1, "tokenizer.patch_size must be >= 1")
        needs_path = self.kind in LEARNED_KINDS or self.kind == "vae"
        check(not needs_path or self.path is not None,
              f"tokenizer.kind={self.kind} needs tokenizer.path (a tokenizer directory)")
        check(needs_path or self.path is None,
              f"tokenizer.path is for learned and pretrained tokenizers, not {self.kind}")

    @property
    def discrete(self) -> bool:
        return self.kind in DISCRETE_KINDS


LOG_SINKS = ("tensorboard", "wandb")  # train.log_to's sinks (isynth.tracking), each an optional extra


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128         # global batch (split across DDP ranks)
    lr: float = 1e-3                        # peak learning rate (AdamW), after the warm-up
    min_lr: float = 1e-5          # end of the cosine schedule
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after the warm-up (constant: MAR's and GET's)
    warmup_fraction: float = 0.05 # of total steps (RAR: 100 of 400 epochs = 0.25)
    weight_decay: float = 0.03              # AdamW decoupled weight decay (none on biases, norms, embeddings)
    beta1: float = 0.9                      # AdamW first-moment decay
    beta2: float = 0.96                     # AdamW second-moment decay
    grad_clip: float = 1.0                  # clip the global gradient norm to this
    ema_decay: float = 0.999      # with the usual (1+s)/(10+s) warm-up of the decay
    max_steps: int | None = None  # budget in optimizer steps ...
    train_flops: float | None = None  # ... or in training FLOPs (exactly one is set)
    seed: int = 0                           # initial weights and every step's randomness (exact resumption)
    log_every: int = 10                     # steps between log.jsonl lines (and divergence checks)
    ckpt_every: int = 100                   # steps between checkpoints
    eval_num_samples: int = 1000  # samples drawn by `isynth eval`
    # Batches with a non-finite loss or gradient norm: 0 stops training at the first (exit 3, the last good
    # checkpoint kept); N > 0 skips up to N of them without an update, as large-scale trainers do.
    skip_nonfinite: int = 0
    # torch.compile of the backbone's training forward: auto = on CUDA only (on CPU the eager fp32 path
    # keeps bit-exact resumption and compiling costs more than it saves at laptop sizes)
    compile: Literal["auto", "on", "off"] = "auto"
    grad_accum: int = 1           # micro-batches per optimizer step (the global batch is split further)
    checkpoint_activations: bool = False  # recompute each block in the backward pass (memory for compute)
    sample_every: int = 0         # steps between sample grids (RUN/samples/, EMA weights, fixed labels); 0: none
    log_to: str = "none"          # sinks besides log.jsonl: none, tensorboard, wandb or tensorboard,wandb

    def __post_init__(self):
        check(self.batch_size > 0, "train.batch_size must be > 0")
        check(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
              f"train.grad_accum must be >= 1 and divide train.batch_size={self.batch_size}, got {self.grad_accum}")
        check(0 < self.lr < math.inf and 0 <= self.min_lr <= self.lr,
              "train.lr must be > 0 and 0 <= train.min_lr <= lr")
        check(0 <= self.warmup_fraction < 1, "train.warmup_fraction must be in [0, 1)")
        check(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        check(self.grad_clip > 0, "train.grad_clip must be > 0")
        check(self.skip_nonfinite >= 0, "train.skip_nonfinite must be >= 0")
        check(0 <= self.seed < 2**63, f"train.seed must be in [0, 2^63), got {self.seed}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and beta2 must be in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        check(self.eval_num_samples >= 4, "train.eval_num_samples must be >= 4 (k + 1 for precision and recall)")
        check((self.max_steps is None) != (self.train_flops is None),
              "set exactly one training budget: train.max_steps or train.train_flops")
        check(self.max_steps is None or self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}")
        check(self.train_flops is None or 0 < self.train_flops < math.inf,
              f"train.train_flops must be a finite number > 0, got {self.train_flops}")
        check(self.log_every > 0 and self.ckpt_every > 0, "train.log_every and train.ckpt_every must be > 0")
        check(self.sample_every >= 0, f"train.sample_every must be >= 0 (0: no sample grids), got {self.sample_every}")
        unknown = [n for n in self.log_sinks if n not in LOG_SINKS]
        check(not unknown, f"train.log_to: unknown sink {unknown[0] if unknown else ''!r}; use none, "
                           f"{', '.join(LOG_SINKS)} or a comma-separated list of them")

    @property
    def log_sinks(self) -> tuple[str, ...]:
        """The tracking sinks of `log_to`, each once, in the order given (none: no sink)."""
        names = [n.strip() for n in self.log_to.split(",")]
        return () if names == ["none"] else tuple(dict.fromkeys(names))


M = TypeVar("M")  # a paradigm's training section (its `Config`)
S = TypeVar("S")  # its sampling section (its `Sampling`)


@dataclass(frozen=True)
class RunConfig(Generic[M, S]):
    """Everything a run is: the paradigm, its own two sections and the shared ones."""

    paradigm: str
    method: M
    sample: S
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
