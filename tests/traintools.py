"""Helpers of the training tests (test_train.py, test_resume.py): reading run directories, and a crash at a
chosen step."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import isynth.trainer as trainer
from isynth.checkpoint import CHECKPOINT, CONFIG, LOG

RUN_FILES = {CONFIG, CHECKPOINT, LOG, "loss.png", "loss.svg"}
LOG_KEYS = {"step", "loss", "grad_norm", "lr", "train_flops", "samples_per_s", "mfu", "elapsed_s"}
# rar exercises every kind of per-step randomness: batch choice, label dropout, random orders annealed over
# the run (total 12 -> anneal between steps 6 and 9), and here dropout masks too.
RESUME_OVERRIDES = ["train.max_steps=12", "train.ckpt_every=4", "train.log_every=2",
                    "model.dropout=0.1", "model.attn_dropout=0.1"]


class Crash(Exception):
    """Stands in for a process dying at a chosen point of the loop."""


def sub_env(cache: Path) -> dict:
    return dict(os.environ, ISYNTH_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / CHECKPOINT)


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = tensors(a_dir), tensors(b_dir)
    assert a.keys() == b.keys()
    prefixes = {k.split("/")[0] for k in a}
    assert prefixes == {"model", "ema", "optim"}
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def meta_of(run_dir: Path) -> dict:
    with safe_open(Path(run_dir) / CHECKPOINT, framework="pt") as f:
        return json.loads(f.metadata()["meta"])


def log_of(run_dir: Path) -> list[dict]:
    """The training records of the log; event records (a changed budget) are `events_of`'s."""
    return [rec for rec in _records(run_dir) if "event" not in rec]


def events_of(run_dir: Path) -> list[dict]:
    return [rec for rec in _records(run_dir) if "event" in rec]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / LOG).read_text().splitlines()]


def deterministic(rec: dict) -> dict:
    """The log fields that must be identical between an interrupted and an uninterrupted run."""
    return {k: rec[k] for k in ("step", "loss", "lr", "train_flops")}


def crash_at(monkeypatch, step: int) -> None:
    """Make the loop die in step `step`, after its optimizer update and before its EMA update."""
    real = trainer.ema_decay_at

    def dying(s, decay):
        if s == step:
            raise Crash(f"killed in step {s}")
        return real(s, decay)

    monkeypatch.setattr(trainer, "ema_decay_at", dying)
