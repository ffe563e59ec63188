"""Run directories and checkpoints: safetensors + JSON, written atomically, never pickle.

A run directory holds `config.json` (the RunConfig), `checkpoint.safetensors` (weights, EMA weights and
optimizer state as tensors; step, FLOPs and optimizer hyper-parameters as JSON metadata) and `log.jsonl`.
Every file is written to a temporary name in the same directory and renamed into place, so a process
killed at any instant leaves either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from isynth.errors import IsynthError
from isynth.files import atomic_save_tensors, read_json, remove_dead_temporaries

CONFIG, CHECKPOINT, LOG = "config.json", "checkpoint.safetensors", "log.jsonl"


def config_changes(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_changes(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temporary files of writes that a killed run never finished (of processes that are gone)."""
    remove_dead_temporaries(run_dir)
    remove_dead_temporaries(Path(run_dir) / "samples")  # sample grids (isynth.tracking)


def read_config_dict(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise IsynthError(f"{run_dir} is not an isynth run directory (no {CONFIG})")
    data = read_json(path, "config")
    if not isinstance(data, dict) or "paradigm" not in data:
        raise IsynthError(f"{path}: not an isynth config")
    return data


def save_checkpoint(path: Path, model: dict, ema: dict, optimizer: dict, meta: dict) -> None:
    """One safetensors file: 'model/…', 'ema/…', 'optim/<param>/<state>' tensors + JSON metadata."""
    tensors = {f"model/{k}": v for k, v in model.items()}
    tensors.update({f"ema/{k}": v for k, v in ema.items()})
    for idx, state in optimizer["state"].items():
        for name, value in state.items():
            tensors[f"optim/{idx}/{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"meta": json.dumps(meta), "param_groups": json.dumps(optimizer["param_groups"])}
    atomic_save_tensors(path, tensors, metadata)


def load_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(model state, EMA state, optimizer state dict, meta) from `save_checkpoint`'s file."""
    path = Path(path)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        meta = json.loads(metadata["meta"])
        groups = json.loads(metadata["param_groups"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise IsynthError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None
    model, ema, state = {}, {}, {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model[rest] = value
        elif kind == "ema":
            ema[rest] = value
        elif kind == "optim":
            idx, _, name = rest.partition("/")
            state.setdefault(int(idx), {})[name] = value
    return model, ema, {"state": state, "param_groups": groups}, meta


def check_state(own: dict, state: dict, source: Path, what: str = "weights") -> None:
    """`state` has exactly `own`'s tensors, each with its shape and dtype, every value finite; else one
    error naming the first tensor that is not so (another config's checkpoint, or an edited file)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise IsynthError(f"{source}: checkpoint does not match this run's config ({what}: "
                          + (f"missing {missing[:2]})" if missing else f"unexpected {unexpected[:2]})"))
    for k, mine in own.items():
        t = state[k]
        if t.shape != mine.shape:
            raise IsynthError(f"{source}: checkpoint does not match this run's config ({what}: shape of {k} "
                              f"{tuple(t.shape)} != {tuple(mine.shape)})")
        if t.dtype != mine.dtype:
            raise IsynthError(f"{source}: {what} tensor {k} is {t.dtype}, the model's is {mine.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IsynthError(f"{source}: {what} tensor {k} holds non-finite values")


def load_weights(module: torch.nn.Module, state: dict, source: Path, what: str = "weights") -> None:
    """Load a state dict, turning a mismatch (another config's checkpoint) into one clear error."""
    check_state(module.state_dict(), state, source, what)
    module.load_state_dict(state)


def check_optimizer(opt: torch.optim.Optimizer, state: dict, source: Path) -> None:
    """The saved AdamW state fits `opt`'s parameters: the same groups, and per parameter a finite scalar
    step and moments of the parameter's shape and dtype."""
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = state.get("param_groups")
    if not isinstance(groups, list) or [len(g.get("params", [])) for g in groups if isinstance(g, dict)] != \
            [len(g["params"]) for g in opt.param_groups]:
        raise IsynthError(f"{source}: optimizer state does not match this run's parameter groups")
    for idx, entry in state["state"].items():
        if not 0 <= idx < len(params):
            raise IsynthError(f"{source}: optimizer state for parameter {idx}, the run has {len(params)}")
        for name, t in entry.items():
            want = () if name == "step" else params[idx].shape
            if name not in ("step", "exp_avg", "exp_avg_sq") or t.shape != want:
                raise IsynthError(f"{source}: optimizer tensor {idx}/{name} {tuple(t.shape)} does not fit "
                                  f"parameter {idx} {tuple(params[idx].shape)}")
            if t.dtype != (torch.float32 if name == "step" else params[idx].dtype) or not bool(torch.isfinite(t).all()):
                raise IsynthError(f"{source}: optimizer tensor {idx}/{name} has dtype {t.dtype} or non-finite values")


def check_meta(meta: object, total_steps: int | None, source: Path) -> dict:
    """The checkpoint's metadata: step an integer in [0, total steps] (None: any >= 0), FLOPs and time
    finite and >= 0."""
    def number(key: str, integer: bool = False) -> float:
        v = meta.get(key) if isinstance(meta, dict) else None
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise IsynthError(f"{source}: checkpoint metadata {key!r} must be a finite "
                              f"{'integer' if integer else 'number'} >= 0, got {v!r}")
        return v
    step = number("step", integer=True)
    if total_steps is not None and step > total_steps:
        raise IsynthError(f"{source}: checkpoint step {step} is past this run's {total_steps} steps")
    number("train_flops")
    number("elapsed_s")
    return meta
