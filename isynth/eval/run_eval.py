"""`isynth eval`: sample a trained run, score the samples, measure throughput, write metrics.json."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from isynth.errors import IsynthError
from isynth.eval.features import get_feature_net
from isynth.eval.images import save_grid, save_samples
from isynth.eval.metrics import evaluate_samples
from isynth.files import atomic_write_text
from isynth.paradigms.base import Paradigm
from isynth.runs import balanced_labels, generate, load_trained

METRICS = "metrics.json"
STAGE = ".eval-"  # + pid: where an eval stages its files before moving them into the run directory
MIN_SAMPLES = 4  # k + 1 for the k = 3 nearest neighbours of precision and recall
GRID_MAX = 540  # tiles in samples.png: ten per class for digits, every class once for shapes


@torch.no_grad()
def heldout_nll(model: Paradigm, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float | None:
    """Mean NLL in bits per token over the held-out split, or None where the paradigm has none."""
    total, count = 0.0, 0
    for i in range(0, len(labels), batch):  # np.array: writable copies (shapes' splits are read-only)
        tokens = model.tokenizer.encode(torch.from_numpy(np.array(images[i:i + batch]))).to(model.device)
        bits = model.nll_bits_per_token(tokens, torch.from_numpy(np.array(labels[i:i + batch])).to(model.device))
        if bits is None:
            return None
        total, count = total + bits.sum().item(), count + bits.numel()
    return total / count


def evaluate_run(run_dir: Path, num_samples: int | None = None, sampling=None, seed: int = 0,
                 use_ema: bool = True) -> dict:
    """Sample the run, score the samples and write samples.npz, samples.png and metrics.json. The three are
    staged in a hidden directory and moved into place only after scoring succeeded (metrics.json last), so
    a failed or killed eval leaves the previous results as they were; what a killed one staged is removed
    by the next."""
    run_dir = Path(run_dir)
    model, dataset, meta = load_trained(run_dir, use_ema=use_ema)
    s = sampling or model.run.sample
    n = num_samples or model.run.train.eval_num_samples
    if n < MIN_SAMPLES:  # before any sampling: the metrics need a covariance and k nearest neighbours
        raise IsynthError(f"evaluation needs at least {MIN_SAMPLES} samples, got {n}")
    feature_net = get_feature_net(dataset)
    remove_stale_stages(run_dir)
    # Every class equally often (each cycle of num_classes holds each once), and on shapes every (shape,
    # colour) pair within any 30 samples, so held-out combinations are always asked for.
    labels = balanced_labels(n, dataset.conditions)
    generate(model, labels[: min(8, n)], s, seed=seed)  # warm-up, so the timing below is steady state
    images, seconds = generate(model, labels, s, seed=seed)
    stage = run_dir / f"{STAGE}{os.getpid()}"
    stage.mkdir(exist_ok=True)
    try:
        result = _score(model, dataset, meta, s, n, images, labels, seconds, use_ema, feature_net, stage)
        for name in ("samples.npz", "samples.png", METRICS):
            os.replace(stage / name, run_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def remove_stale_stages(run_dir: Path) -> None:
    """Delete the staging directories of evals whose process is gone (killed mid-way)."""
    for d in Path(run_dir).glob(f"{STAGE}*"):
        pid = d.name[len(STAGE):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _score(model, dataset, meta, s, n, images, labels, seconds, use_ema, feature_net, stage: Path) -> dict:
    save_samples(stage / "samples.npz", images, labels)
    save_grid(stage / "samples.png", images[: min(10 * dataset.num_classes, GRID_MAX)])
    scores = evaluate_samples(images, labels, dataset, feature_net)
    fd = scores.pop("fd")
    result = {
        "paradigm": model.run.paradigm,
        "step": meta["step"],
        "train_flops": meta["train_flops"],
        "train_time_s": meta["elapsed_s"],
        "params": model.num_params(),
        "train_flops_per_sample": model.train_flops_per_sample(),
        "sample_flops_per_image": model.sample_flops(s),
        "nfe": model.num_network_evals(s),
        "sampling": asdict(s),
        "ema": use_ema,
        "images_per_s": n / seconds,
        "sample_device": str(model.device),
        f"fd_{dataset.name}": fd,
        **scores,
        "nll_bits_per_token": heldout_nll(model, dataset.eval_images, dataset.eval_labels),
    }
    atomic_write_text(stage / METRICS, json.dumps(result, indent=2) + "\n")
    return result
