"""Making teacher (noise, image) pairs for GET (Geng et al. 2023): `isynth pairs TEACHER_RUN --num-pairs N
--out DIR`. The directory's format is `isynth.pairformat`.

GET distils a deterministic sampler: each pair is the initial noise and the image the teacher's ODE
sampler maps it to (GET used EDM's 18-step Heun sampler; here the teacher is an isynth `diffusion` run).

Shard i is a pure function of (teacher checkpoint, sampler, seed, i): its noise comes from a generator
seeded with (seed, i) and its labels cycle through the classes by global index (`balanced_labels`). So a
killed run resumes at its first missing shard, and asking for more pairs later appends shards to the same
directory. Each shard and the manifest are written to a temporary file and renamed: never half a shard.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from isynth.checkpoint import CHECKPOINT
from isynth.errors import IsynthError
from isynth.files import (
    atomic_save_tensors,
    atomic_write_text,
    new_directory,
    one_writer,
    remove_dead_temporaries,
    sha256_file,
)
from isynth.pairformat import FORMAT, MANIFEST, read_manifest, shard_name
from isynth.paradigms.base import FromNoise
from isynth.runs import balanced_labels, check_sampling_memory, load_trained, shard_seed

TEACHER_PARADIGMS = ("diffusion",)  # paradigms with a deterministic noise -> image map (`sample_from`)


def _shard_noise(seed: int, index: int, shard_size: int, seq_len: int, token_dim: int) -> torch.Tensor:
    """The full shard's noise (shard_size, N, D): a partial last shard is a prefix of the full one."""
    gen = torch.Generator().manual_seed(shard_seed(seed, index))
    return torch.randn(shard_size, seq_len, token_dim, generator=gen)


@one_writer("out")
def generate_pairs(teacher_dir: Path, num_pairs: int, out: Path, sampling=None, seed: int = 0,
                   shard_size: int = 1024, use_ema: bool = True, progress: bool = True) -> dict:
    """Generate (or resume, or extend to) `num_pairs` teacher pairs in `out`; returns the manifest. The
    teacher samples with `sampling`, by default its run's own settings."""
    if num_pairs < 1:
        raise IsynthError(f"--num-pairs must be >= 1, got {num_pairs}")
    if shard_size < 1:
        raise IsynthError(f"--shard-size must be >= 1, got {shard_size}")
    teacher_dir, out = Path(teacher_dir), Path(out)
    model, dataset, meta = load_trained(teacher_dir, use_ema=use_ema)
    if model.run.paradigm not in TEACHER_PARADIGMS or not isinstance(model, FromNoise):
        raise IsynthError(f"{teacher_dir} is a {model.run.paradigm!r} run; a pair teacher must be a "
                          f"{' or '.join(map(repr, TEACHER_PARADIGMS))} run (a deterministic ODE sampler)")
    s = sampling or model.run.sample
    # A shard's noise and targets (float32 tokens) are held at once, beside one sampling batch.
    count = min(shard_size, num_pairs)
    check_sampling_memory(model, s, count, (2 * model.seq_len * model.token_dim * 4,), "a shard of pairs")
    identity = {
        "run_dir": str(teacher_dir.resolve()), "paradigm": model.run.paradigm, "step": meta["step"],
        "train_flops": meta["train_flops"], "checkpoint_sha256": sha256_file(teacher_dir / CHECKPOINT), "ema": use_ema,
        "config": model.run.to_dict(),
    }
    fresh = {
        "format": FORMAT, "teacher": identity, "sampling": dataclasses.asdict(s), "seed": seed,
        "shard_size": shard_size, "dataset": dataset.name, "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes, "tokenizer": dataclasses.asdict(model.run.tokenizer),
        "seq_len": model.seq_len, "token_dim": model.token_dim,
        "teacher_sample_flops_per_pair": model.sample_flops(s), "nfe": model.num_network_evals(s),
        "num_pairs": 0, "shards": [],
    }
    manifest = _resume_manifest(out, fresh)
    if not (out / MANIFEST).is_file():  # the directory appears with its manifest: never one a rerun refuses
        new_directory(out, lambda d: atomic_write_text(d / MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    remove_dead_temporaries(out)  # what a killed run was writing
    dev = model.device
    bar = tqdm(total=num_pairs, initial=manifest["num_pairs"], desc="pairs", unit="pair",
               disable=not progress or None, leave=False)
    while manifest["num_pairs"] < num_pairs:
        shards = manifest["shards"]
        if shards and shards[-1]["count"] < shard_size:  # extend a partial last shard: regenerate it whole
            popped = shards.pop()["count"]
            manifest["num_pairs"] -= popped
            bar.update(-popped)
        i, start = len(shards), manifest["num_pairs"]
        count = min(shard_size, num_pairs - start)
        noise = _shard_noise(seed, i, shard_size, model.seq_len, model.token_dim)[:count]
        labels = torch.from_numpy(balanced_labels(start + count, dataset.conditions)[start:])
        t0 = time.perf_counter()
        parts = []
        for j in range(0, count, s.batch_size):
            parts.append(model.sample_from(noise[j:j + s.batch_size].to(dev), labels[j:j + s.batch_size].to(dev),
                                           s).cpu())
            bar.update(len(parts[-1]))
        target = torch.cat(parts)
        seconds = time.perf_counter() - t0
        atomic_save_tensors(out / shard_name(i), {"noise": noise.contiguous(), "target": target.contiguous(),
                                                    "labels": labels})
        shards.append({"file": shard_name(i), "count": count, "seconds": round(seconds, 3)})
        manifest["num_pairs"] = start + count
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        bar.set_postfix(pairs_per_s=round(count / seconds, 1))
    bar.close()
    return manifest


def _resume_manifest(out: Path, fresh: dict) -> dict:
    """The manifest to continue: `fresh` for a new directory, the saved one if it has the same teacher,
    sampler and layout; anything else is an error (never mix pairs of two teachers)."""
    path = out / MANIFEST
    if not path.is_file():
        if out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if not p.name.startswith("."))):
            raise IsynthError(f"{out} exists and is not a pair directory (no {MANIFEST}); use a new --out")
        return fresh
    saved = read_manifest(out, complete=False)
    for key in ("teacher", "sampling", "seed", "shard_size", "seq_len", "token_dim"):
        if saved.get(key) != fresh[key]:
            raise IsynthError(f"{out} holds pairs with a different {key} (teacher checkpoint, sampler, seed or "
                              f"shard size changed); use a new --out directory")
    return saved


