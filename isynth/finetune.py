"""`isynth train --init-from RUN`: a new run that starts from another run's weights (fine-tuning, e.g. on a new
dataset or class set with the same image and class shapes).

The source's EMA weights (what sampling and evaluation use, and what fine-tuning usually starts from) become
the new model's weights and its EMA's start; the optimizer starts fresh, and the run keeps its own tokenizer.
Everything is checked before anything is written: the source is a run directory with a checkpoint, of the
same paradigm, and every tensor has the new model's shape. The new run directory then appears with its
config, `init_from.json` (the source's directory, step and checkpoint SHA-256) and a step-0 checkpoint of
those weights, so resuming the new run reads only its own checkpoint, never the source again. The source may
also be a folder written by `isynth export` (its `model.safetensors` holds the EMA weights), e.g. a model
downloaded from the Hub with `huggingface_hub.snapshot_download`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from isynth.checkpoint import CHECKPOINT, check_meta, check_state, load_checkpoint, read_config_dict, save_checkpoint
from isynth.config import RunConfig
from isynth.errors import IsynthError
from isynth.files import atomic_write_text, sha256_file
from isynth.hub import WEIGHTS, load_export
from isynth.paradigms.base import Paradigm

INIT_FROM = "init_from.json"
TOKENIZER = "tokenizer."  # state-dict prefix of the run's own tokenizer, never taken from the source


def _exported_source(source: Path, where: str) -> tuple[dict, int, str, str]:
    """(EMA weights, step, weights file's SHA-256, its name) of an exported folder (`isynth export`), checked as
    `isynth sample` checks it."""
    try:
        model, info = load_export(source, device=torch.device("cpu"))
    except IsynthError as e:
        raise IsynthError(f"{where}: {e}") from None
    return model.state_dict(), info.meta["step"], sha256_file(source / WEIGHTS), WEIGHTS


def _run_source(source: Path, where: str) -> tuple[dict, int, str, str]:
    """The same of a run directory: its checkpoint's EMA weights."""
    ckpt = source / CHECKPOINT
    if not ckpt.is_file():
        raise IsynthError(f"{where} has no checkpoint yet; train it first")
    sha = sha256_file(ckpt)
    _, ema, _, meta = load_checkpoint(ckpt)
    return ema, check_meta(meta, None, ckpt)["step"], sha, CHECKPOINT


def load_init(source: Path, run: RunConfig, model: Paradigm) -> dict:
    """Check `source` (a run directory, or a folder written by `isynth export`) for `run` and load its EMA
    weights into `model`; returns the record of init_from.json."""
    source = Path(source)
    where = f"--init-from {source}"
    if not source.is_dir():
        raise IsynthError(f"{where}: no such run directory")
    data = read_config_dict(source)
    if data.get("paradigm") != run.paradigm:
        raise IsynthError(f"{where} is a {data.get('paradigm')!r} run; a {run.paradigm!r} run cannot start from "
                          "its weights")
    exported = "export" in data
    ema, step, sha, file = (_exported_source if exported else _run_source)(source, where)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(TOKENIZER)}
    state = {k: v for k, v in ema.items() if not k.startswith(TOKENIZER)}
    check_state(own, state, Path(f"{where} ({file})"), "EMA weights")  # names the first tensor that differs
    model.load_state_dict(state, strict=False)
    return {"run_dir": str(source.resolve()), "paradigm": run.paradigm, "step": step, "checkpoint_sha256": sha,
            "weights": "ema", **({"exported": True} if exported else {})}


def write_init(directory: Path, model: Paradigm, optimizer: torch.optim.Optimizer, record: dict, total_steps: int,
               flops_per_sample: int) -> None:
    """Into a new run directory: init_from.json and the step-0 checkpoint (the weights, an EMA equal to them,
    the fresh optimizer), which training and resumption then start from."""
    weights = model.state_dict()
    ema = {k: v.detach().clone() for k, v in weights.items()}  # safetensors refuses two names for one tensor
    meta = {"step": 0, "total_steps": total_steps, "train_flops": 0.0, "elapsed_s": 0.0,
            "flops_per_sample": flops_per_sample, "init_from": record}
    save_checkpoint(Path(directory) / CHECKPOINT, weights, ema, optimizer.state_dict(), meta)
    atomic_write_text(Path(directory) / INIT_FROM, json.dumps(record, indent=2, sort_keys=True) + "\n")
