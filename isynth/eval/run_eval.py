"""`isynth eval`: sample a trained run, score the samples, measure throughput, write metrics.json."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from isynth.eval.features import get_feature_net
from isynth.eval.images import save_grid, save_samples
from isynth.eval.metrics import evaluate_samples
from isynth.files import atomic_write_text
from isynth.paradigms.base import Paradigm
from isynth.runs import balanced_labels, generate, load_trained

METRICS = "metrics.json"
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
    run_dir = Path(run_dir)
    model, dataset, meta = load_trained(run_dir, use_ema=use_ema)
    s = sampling or model.run.sample
    n = num_samples or model.run.train.eval_num_samples
    # Every class equally often (each cycle of num_classes holds each once), and on shapes every (shape,
    # colour) pair within any 30 samples, so held-out combinations are always asked for.
    labels = balanced_labels(n, dataset.conditions)
    generate(model, labels[: min(8, n)], s, seed=seed)  # warm-up, so the timing below is steady state
    images, seconds = generate(model, labels, s, seed=seed)
    save_samples(run_dir / "samples.npz", images, labels)
    save_grid(run_dir / "samples.png", images[: min(10 * dataset.num_classes, GRID_MAX)])
    scores = evaluate_samples(images, labels, dataset, get_feature_net(dataset))
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
    atomic_write_text(run_dir / METRICS, json.dumps(result, indent=2) + "\n")
    return result
