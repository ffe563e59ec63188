"""`isynth sample` at any count: sharded, resumable, distributed sampling into one ADM-layout `.npz`.

Shard k (images k·S … (k+1)·S − 1 of the label list) is a pure function of (checkpoint, sampling settings,
labels, seed, k): its generator is seeded from (seed, k), as the teacher pairs' shards are. So a killed
`isynth sample` resumes at its first missing shard, and under `torchrun` each process samples every
world-th shard and the result is the file one process writes with the same seed (DiT's `sample_ddp.py`
splits 50K samples over GPUs the same way, but by per-rank seeds whose output depends on the GPU count).

Memory stays constant in the number of samples: a process holds one shard, and the final `.npz` is
written by streaming the shards one after another into the archive. The shards live in a hidden
directory beside `--out` and are removed once the `.npz` is in place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from isynth.checkpoint import CHECKPOINT
from isynth.errors import IsynthError
from isynth.eval.images import save_grid, save_samples, save_samples_from_shards
from isynth.files import atomic_write_text, read_json, remove_dead_temporaries, sha256_file, writer_lock
from isynth.hub import WEIGHTS
from isynth.paradigms.base import Paradigm
from isynth.runs import check_sampling_memory, generate, shard_seed

MANIFEST = "manifest.json"
GRID_TILES = 100  # the PNG beside the .npz shows the first hundred samples


def shard_dir(out: Path) -> Path:
    """Where the shards of `out` are kept until the `.npz` is whole."""
    return out.parent / f".{out.name}.shards"


def _shard_file(d: Path, k: int) -> Path:
    return d / f"shard-{k:05d}.npz"


def _identity(run_dir: Path, sampling, labels: np.ndarray, seed: int, shard_size: int, use_ema: bool) -> dict:
    """What every shard depends on: a directory holding another identity's shards starts over."""
    weights = next(p for p in (Path(run_dir) / CHECKPOINT, Path(run_dir) / WEIGHTS) if p.is_file())
    return {"weights_sha256": sha256_file(weights), "run_dir": str(Path(run_dir).resolve()),
            "ema": use_ema, "sampling": dataclasses.asdict(sampling), "seed": seed, "shard_size": shard_size,
            "num_samples": len(labels), "labels_sha256": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()}


def _prepare(d: Path, identity: dict) -> None:
    """Keep the shards of an interrupted run with the same identity; otherwise start an empty directory."""
    if (d / MANIFEST).is_file():
        try:
            same = read_json(d / MANIFEST, "shard manifest") == identity
        except IsynthError:
            same = False
        if same:
            remove_dead_temporaries(d)  # what a killed process was writing
            return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    atomic_write_text(d / MANIFEST, json.dumps(identity, indent=2) + "\n")


def sample_to_file(model: Paradigm, run_dir: Path, labels: np.ndarray, sampling, out: Path, seed: int = 0,
                   shard_size: int = 1000, use_ema: bool = True, progress: bool = False) -> dict:
    """Sample one image per label into `out` (.npz, plus a .png grid of the first 100). Resumes what a killed
    call with the same settings left; under torchrun (an initialised process group) every process samples its
    share of the shards and rank 0 writes the file. Returns counts and the measured images/s."""
    if shard_size < 1:
        raise IsynthError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    check_sampling_memory(model, sampling, min(shard_size, len(labels)), model.tokenizer.image_shape,
                          "sampling one shard")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    d = shard_dir(out)
    num_shards = -(-len(labels) // shard_size)
    with writer_lock(out) if rank == 0 else nullcontext():
        if rank == 0:
            for name in (out.name, out.with_suffix(".png").name):  # what a killed merge left beside --out
                remove_dead_temporaries(out.parent, name)
            _prepare(d, _identity(run_dir, sampling, labels, seed, shard_size, use_ema))
        if world > 1:
            dist.barrier()
        t0, made = time.perf_counter(), 0
        for k in range(rank, num_shards, world):
            path = _shard_file(d, k)
            if path.is_file():  # written whole by an earlier, interrupted call
                continue
            lab = labels[k * shard_size:(k + 1) * shard_size]
            images, _ = generate(model, lab, sampling, seed=shard_seed(seed, k), progress=progress and world == 1,
                                 desc=f"shard {k + 1}/{num_shards}")
            save_samples(path, images, lab)
            made += len(lab)
        if world > 1:  # every process's count (and a barrier: all shards are on disk after it)
            count = torch.tensor([made])
            dist.all_reduce(count)
            made = int(count.item())
        seconds = time.perf_counter() - t0
        if rank == 0:
            shards = [_shard_file(d, k) for k in range(num_shards)]
            save_samples_from_shards(out, shards)
            first = np.load(shards[0])["arr_0"][:GRID_TILES]
            save_grid(out.with_suffix(".png"), first)
            shutil.rmtree(d, ignore_errors=True)
        if world > 1:  # no process leaves the group before the file is written
            dist.barrier()
            dist.destroy_process_group()
        if rank != 0:
            return {}
    return {"out": str(out), "num_samples": len(labels), "shards": num_shards, "processes": world,
            "sampled_now": made, "images_per_s": round(made / seconds, 2) if made else None}
