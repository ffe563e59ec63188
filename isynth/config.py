"""Frozen, typed configuration: one dataclass per component, a run = their composition.

Every dataclass validates itself in `__post_init__` and raises `IsynthError` with one line naming the
field, so the CLI can reject bad overrides before anything is written. Paradigm-specific settings
(`method`, `sample`) are dataclasses defined next to each paradigm and resolved through its registry.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from isynth.errors import IsynthError


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise IsynthError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """The shared transformer backbone."""

    width: int = 128              # model dimension C
    depth: int = 4                # number of blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0        # MLP hidden = mlp_ratio * width
    dropout: float = 0.0          # residual / MLP dropout (RAR: 0.1)
    attn_dropout: float = 0.0     # attention-probability dropout (RAR: 0.1)
    qk_norm: bool = False         # LayerNorm on q and k per head (RAR reference)
    adaln: bool = False           # adaLN-Zero conditioning of every block on the condition vector

    def __post_init__(self):
        check(self.width > 0 and self.depth > 0 and self.num_heads > 0, "model.width, depth, num_heads must be > 0")
        check(self.width % self.num_heads == 0, f"model.width={self.width} must be divisible by num_heads={self.num_heads}")
        check(self.mlp_ratio > 0, "model.mlp_ratio must be > 0")
        check(0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1, "model dropouts must be in [0, 1)")

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.width)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "npz"] = "digits"
    path: str | None = None       # .npz file for name=npz (arr_0 uint8 NHWC, labels int64)
    eval_fraction: float = 0.2    # held-out share, split by a seeded permutation
    split_seed: int = 0

    def __post_init__(self):
        check(0 < self.eval_fraction < 1, "data.eval_fraction must be in (0, 1)")


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["grey", "patch"] = "grey"
    levels: int = 17              # grey: number of quantisation levels (17 is lossless for digits)
    patch_size: int = 1           # patch: side of the square patch per continuous token

    def __post_init__(self):
        check(2 <= self.levels <= 256, "tokenizer.levels must be in [2, 256]")
        check(self.patch_size >= 1, "tokenizer.patch_size must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128         # global batch (split across DDP ranks)
    lr: float = 1e-3
    min_lr: float = 1e-5          # end of the cosine schedule
    warmup_fraction: float = 0.05 # of total steps (RAR: 100 of 400 epochs = 0.25)
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.96
    grad_clip: float = 1.0
    ema_decay: float = 0.999      # with the usual (1+s)/(10+s) warm-up of the decay
    max_steps: int | None = None  # budget in optimizer steps ...
    train_flops: float | None = None  # ... or in training FLOPs (exactly one is set)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    eval_num_samples: int = 1000  # samples drawn by `isynth eval`

    def __post_init__(self):
        check(self.batch_size > 0, "train.batch_size must be > 0")
        check(0 < self.lr < float("inf") and 0 <= self.min_lr <= self.lr, "train.lr must be > 0 and 0 <= train.min_lr <= lr")
        check(0 <= self.warmup_fraction < 1, "train.warmup_fraction must be in [0, 1)")
        check(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        check(self.grad_clip > 0, "train.grad_clip must be > 0")
        check((self.max_steps is None) != (self.train_flops is None),
              "set exactly one training budget: train.max_steps or train.train_flops")
        check(self.max_steps is None or self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}")
        check(self.train_flops is None or 0 < self.train_flops < float("inf"),
              f"train.train_flops must be a finite number > 0, got {self.train_flops}")
        check(self.log_every > 0 and self.ckpt_every > 0, "train.log_every and train.ckpt_every must be > 0")
        check(self.eval_num_samples > 0, "train.eval_num_samples must be > 0")


@dataclass(frozen=True)
class RunConfig:
    paradigm: str
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None            # the paradigm's own config dataclass
    sample: Any = None            # the paradigm's sampling config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# Overrides: "section.field=value" strings applied to a frozen config with type checking.

def _parse_value(text: str, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_value(text, a, name)
            except IsynthError as e:
                errors.append(str(e))
        raise IsynthError(errors[0] if errors else f"invalid value {text!r} for {name}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise IsynthError(f"invalid value {text!r} for {name}: choose one of {', '.join(map(str, choices))}")
        return text
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise IsynthError(f"invalid value {text!r} for {name}: expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:  # allow 1e4 for integers when exact
                v = float(text)
            except ValueError:
                v = None
            if v is not None and v.is_integer():
                return int(v)
            raise IsynthError(f"invalid value {text!r} for {name}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise IsynthError(f"invalid value {text!r} for {name}: expected a number") from None
    if tp is str:
        return text
    raise IsynthError(f"cannot override {name} (type {tp})")


def _field_types(obj) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def with_overrides(obj, overrides: dict[str, str], prefix: str = ""):
    """Return a copy of dataclass `obj` with dotted overrides applied (validated by __post_init__)."""
    nested: dict[str, dict[str, str]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in fields(obj)}
    types_ = _field_types(obj)
    for key, text in overrides.items():
        head, _, rest = key.partition(".")
        full = prefix + head
        if head not in names:
            raise IsynthError(f"unknown config field {full!r}; known: {', '.join(sorted(names))}")
        value = getattr(obj, head)
        if dataclasses.is_dataclass(value):
            if not rest:
                raise IsynthError(f"{full!r} is a section; set one of its fields, e.g. {full}.<field>=...")
            nested.setdefault(head, {})[rest] = text
        else:
            if rest:
                raise IsynthError(f"{full!r} has no field {rest!r}")
            direct[head] = _parse_value(text, types_[head], full)
    for head, sub in nested.items():
        direct[head] = with_overrides(getattr(obj, head), sub, prefix + head + ".")
    return dataclasses.replace(obj, **direct) if direct else obj


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise IsynthError(f"invalid override {item!r}: expected section.field=value, e.g. model.width=64")
        out[key.strip()] = value.strip()
    return out


def from_dict(cls, data: dict):
    """Rebuild a (non-nested) dataclass from a dict, rejecting unknown keys."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise IsynthError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**data)
