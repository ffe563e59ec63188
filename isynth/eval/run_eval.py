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
from isynth.eval.adm import Images, dataset_reference, inception_metrics
from isynth.eval.features import get_feature_net
from isynth.eval.images import save_grid, save_samples
from isynth.eval.inception import load_inception, weights_identity
from isynth.eval.metrics import evaluate_samples
from isynth.files import atomic_write_text, process_alive, sha256_file
from isynth.paradigms.base import Paradigm
from isynth.runs import balanced_labels, check_sampling_memory, generate, load_trained

METRICS = "metrics.json"
STAGE = ".eval-"  # + pid: where an eval stages its files before moving them into the run directory
COMMIT = ".eval-commit-"  # + pid: a whole stage, renamed so; its files are moved in even after a kill
RESULTS = ("samples.npz", "samples.png", METRICS)  # moved in this order: metrics.json last
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
                 use_ema: bool = True, inception_weights: Path | None = None, progress: bool = False) -> dict:
    """Sample the run, score the samples and write samples.npz, samples.png and metrics.json (with
    `inception_weights`, a FID Inception-v3 weights file, the Inception metrics too, under "inception").

    The three replace the previous results as one: they are staged in a hidden directory, which is renamed to
    a commit directory once scoring succeeded, and then moved into place (metrics.json last, naming the
    SHA-256 of its samples.npz). A failed eval, or one killed before its commit, leaves the previous results
    as they were; one killed during the moves is finished by the next eval (`recover_results`)."""
    run_dir = Path(run_dir)
    model, dataset, meta = load_trained(run_dir, use_ema=use_ema)
    s = sampling or model.run.sample
    n = num_samples or model.run.train.eval_num_samples
    if n < MIN_SAMPLES:  # before any sampling: the metrics need a covariance and k nearest neighbours
        raise IsynthError(f"evaluation needs at least {MIN_SAMPLES} samples, got {n}")
    # The weights file and the reference are checked before any work, so a bad file costs no samples.
    inception = None if inception_weights is None else \
        (load_inception(inception_weights, model.device), dataset_reference(dataset), inception_weights)
    check_sampling_memory(model, s, n, dataset.image_shape, "evaluation")
    feature_net = get_feature_net(dataset)
    recover_results(run_dir)
    # Every class equally often (each cycle of num_classes holds each once), and on shapes every (shape,
    # colour) pair within any 30 samples, so held-out combinations are always asked for.
    labels = balanced_labels(n, dataset.conditions)
    generate(model, labels[: min(8, n)], s, seed=seed)  # warm-up, so the timing below is steady state
    images, seconds = generate(model, labels, s, seed=seed, progress=progress, desc="eval samples")
    stage = run_dir / f"{STAGE}{os.getpid()}"
    stage.mkdir(exist_ok=True)
    try:
        result = _score(model, dataset, meta, s, n, images, labels, seconds, use_ema, feature_net, stage, inception)
        commit = run_dir / f"{COMMIT}{os.getpid()}"
        os.rename(stage, commit)  # the results are whole: from here on they replace the previous ones
        _move_in(commit, run_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _move_in(commit: Path, run_dir: Path) -> None:
    for name in RESULTS:
        if (commit / name).exists():  # a resumed move finds some already in place
            os.replace(commit / name, run_dir / name)
    shutil.rmtree(commit)


def recover_results(run_dir: Path) -> None:
    """What killed evals left: finish moving the results of one that committed, delete what others only
    staged (of processes that are gone)."""
    for d in sorted(Path(run_dir).glob(f"{STAGE}*")):
        committed = d.name.startswith(COMMIT)
        pid = d.name[len(COMMIT if committed else STAGE):]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if committed:
            _move_in(d, run_dir)
        else:
            shutil.rmtree(d, ignore_errors=True)


def _score(model, dataset, meta, s, n, images, labels, seconds, use_ema, feature_net, stage: Path,
           inception=None) -> dict:
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
    if inception is not None:
        net, reference, weights = inception
        result["inception"] = {**inception_metrics(net, Images.from_array(images, "samples"), reference),
                               **weights_identity(weights)}
    result["samples_sha256"] = sha256_file(stage / "samples.npz")  # which samples.npz these scores describe
    atomic_write_text(stage / METRICS, json.dumps(result, indent=2) + "\n")
    return result
