"""Setting config fields by dotted name: command-line overrides (`section.field=value` strings), presets
(Python values) and a run's config.json all go through this one module, so a value is checked the same way
wherever it comes from, and a field a config does not have is always an error.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Literal, TypeVar

from isynth.errors import IsynthError

T = TypeVar("T")

# Names of earlier versions, with the name that replaced them (one clear error instead of "unknown field").
RENAMED = {
    "sample.cfg_scale": "sample.guidance.scale",
    "sample.cfg_pow": "sample.guidance.pow (with sample.guidance.schedule=pow-cosine)",
    "sample.cfg_schedule": "sample.guidance.schedule",
    "sample.cfg_t_min": "sample.guidance.t_min",
    "sample.cfg_t_max": "sample.guidance.t_max",
    "sample.temperature": "sample.head.temperature",
    "sample.top_k": "sample.head.top_k",
    "sample.top_p": "sample.head.top_p",
    "sample.head_sampler": "sample.head.sampler",
    "sample.head_steps": "sample.head.steps",
    "sample.head_order": "sample.head.order",
    "method.head_width": "method.head.width",
    "method.head_depth": "method.head.depth",
    "method.diffusion_batch_mul": "method.head.diffusion_batch_mul",
}


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """["model.width=64", ...] -> {"model.width": "64", ...}."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise IsynthError(f"invalid override {item!r}: expected section.field=value, e.g. model.width=64")
        out[key.strip()] = value.strip()
    return out


def dataset_overrides(dataset: str | None) -> list[str]:
    """The command line's --dataset (digits | shapes | path/to/data.npz | folder:PATH | latents:DIR) as
    `data.` overrides."""
    if dataset is None:
        return []
    if dataset in ("digits", "shapes"):
        return [f"data.name={dataset}"]
    for kind in ("folder", "latents"):
        if dataset.startswith(f"{kind}:"):
            return [f"data.name={kind}", f"data.path={dataset.removeprefix(kind + ':')}"]
    if dataset.endswith(".npz"):
        return ["data.name=npz", f"data.path={dataset}"]
    raise IsynthError(f"unknown dataset {dataset!r}: use digits, shapes, a path to an .npz file, folder:PATH or "
                      "latents:DIR")


def budget_overrides(steps: int | None, flops: float | None) -> list[str]:
    """The command line's --steps or --flops as `train.` overrides (one replaces the other)."""
    if steps is not None and flops is not None:
        raise IsynthError("give one budget: --steps or --flops, not both")
    if steps is not None:
        return [f"train.max_steps={steps}", "train.train_flops=none"]
    if flops is not None:
        return [f"train.train_flops={flops}", "train.max_steps=none"]
    return []


def apply(obj: T, values: Mapping[str, object], prefix: str = "") -> T:
    """A copy of dataclass `obj` with `values` set, keyed by dotted name below `prefix` (e.g. "sample.").
    A str value is parsed by the field's type; any other value must already have that type. The result is
    validated by the dataclasses' own checks."""
    names = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    nested: dict[str, dict[str, object]] = {}
    direct: dict[str, object] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        full = prefix + head
        if head not in names:
            raise IsynthError(_unknown(prefix + key, full, names))
        current = getattr(obj, head)
        if dataclasses.is_dataclass(current):
            if not rest:
                raise IsynthError(f"{full!r} is a section; set one of its fields, e.g. {full}.<field>=...")
            nested.setdefault(head, {})[rest] = value
        elif rest:
            unused = current is None and _is_section(hints[head])
            why = "is not used by this run" if unused else f"has no field {rest!r}"
            raise IsynthError(f"{full!r} {why}")
        else:
            direct[head] = _value(value, hints[head], full)
    for head, sub in nested.items():
        direct[head] = apply(getattr(obj, head), sub, prefix + head + ".")
    return dataclasses.replace(obj, **direct) if direct else obj


# Values a later version renamed, read from older config.json files: (field, old value) -> new value.
RENAMED_VALUES = {("method.order", "raster"): "scan", ("sample.order", "raster"): "scan"}


def merge(obj: T, data: object, prefix: str = "") -> T:
    """`obj` with every field replaced from `data` (a parsed config.json section): no field may be unknown,
    every section must be present, and each value must have the field's type (nothing is parsed from text).
    A missing setting is one a later version added: it keeps `obj`'s default, which every added setting
    chooses to reproduce the earlier behaviour, so older runs stay readable and resumable."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise IsynthError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(obj)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise IsynthError(_unknown(prefix + unknown[0], prefix + unknown[0], set(names)))
    missing = [n for n in names if n not in data and dataclasses.is_dataclass(getattr(obj, n))]
    if missing:
        raise IsynthError(f"{where} is incomplete: no {prefix + missing[0]!r}")
    hints = typing.get_type_hints(type(obj))
    values = {}
    for name in (n for n in names if n in data):
        current, full = getattr(obj, name), prefix + name
        if dataclasses.is_dataclass(current):
            values[name] = merge(current, data[name], full + ".")
        else:
            value = data[name]
            value = RENAMED_VALUES.get((full, value), value) if isinstance(value, str) else value
            values[name] = _value(value, hints[name], full, parse=False)
    return dataclasses.replace(obj, **values)


def _unknown(key: str, full: str, names: set[str]) -> str:
    if key in RENAMED:
        return f"config field {key!r} was renamed: use {RENAMED[key]}"
    return f"unknown config field {full!r}; known: {', '.join(sorted(names))}"


def _is_section(tp: object) -> bool:
    return any(dataclasses.is_dataclass(a) for a in typing.get_args(tp))


def _value(value: object, tp: object, name: str, parse: bool = True) -> object:
    """`value` for a field of type `tp`: parsed from text where `parse` and it is a str, else type-checked.
    Every number must be finite and every integer fit in 64 bits: no setting of isynth means anything by
    infinity or NaN (a CFG scale of inf gave blank images), from the command line or a config.json."""
    v = _typed(value, tp, name, parse)
    if isinstance(v, float) and not math.isfinite(v):
        raise IsynthError(f"invalid value {value!r} for {name}: must be a finite number")
    if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
        raise IsynthError(f"invalid value {value!r} for {name}: must fit in 64 bits")
    return v


def _typed(value: object, tp: object, name: str, parse: bool) -> object:
    if parse and isinstance(value, str):
        return _parse(value, tp, name)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for a in typing.get_args(tp):
            if a is not type(None) and _has_type(value, a):
                return float(value) if a is float else value
    elif _has_type(value, tp):
        return float(value) if tp is float else value
    raise IsynthError(f"invalid value {value!r} for {name}: expected {_type_name(tp)}")


def _has_type(value: object, tp: object) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(tp, type) and isinstance(value, tp)


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse(text: str, tp: object, name: str) -> object:
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
                return _parse(text, a, name)
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
            try:  # 1e4 for an integer, when exact
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
    raise IsynthError(f"cannot set {name} from text (type {_type_name(tp)})")
