"""Run directories and checkpoints: safetensors + JSON, written atomically, never pickle.

A run directory holds `config.json` (the RunConfig), `checkpoint.safetensors` (weights, EMA weights and
optimizer state as tensors; step, FLOPs and optimizer hyper-parameters as JSON metadata) and `log.jsonl`.
Every file is written to a temporary name in the same directory and renamed into place, so a process
killed at any instant leaves either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from isynth.config import RunConfig
from isynth.errors import IsynthError
from isynth.files import atomic_save_tensors, atomic_write_text, read_json

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


def prepare_run_dir(out: Path, run: RunConfig) -> bool:
    """Create `out` with config.json, or check an existing run has the same config. True if resuming."""
    out = Path(out)
    cfg_path = out / CONFIG
    if cfg_path.is_file():
        from isynth.paradigms import run_from_dict  # the paradigms import this module

        saved = run_from_dict(read_config_dict(out)).to_dict()  # settings added since take their defaults
        changes = config_changes(saved, run.to_dict())
        if changes:
            raise IsynthError(f"{out} holds a run with a different config ({'; '.join(changes[:3])}); "
                              "use a new --out directory")
        remove_stale_temps(out)
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IsynthError(f"{out} exists and is not an isynth run directory; use a new --out directory")
    # Build the directory beside its final name and rename it into place: never a half-made run.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        atomic_write_text(tmp / CONFIG, run.to_json())
        if out.exists():
            out.rmdir()  # empty directory made by the user
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return False


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temporary files of writes that a killed run never finished (only the run's own files)."""
    for name in (CONFIG, CHECKPOINT, LOG):
        for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


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


def load_weights(module: torch.nn.Module, state: dict, source: Path) -> None:
    """Load a state dict, turning a mismatch (another config's checkpoint) into one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        what = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                else f"shape of {bad_shape[0]} {tuple(state[bad_shape[0]].shape)} != {tuple(own[bad_shape[0]].shape)}")
        raise IsynthError(f"{source}: checkpoint does not match this run's config ({what})")
    module.load_state_dict(state)
