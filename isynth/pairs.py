"""Teacher (noise, image) pairs for GET (seed 000): `isynth pairs TEACHER_RUN --num-pairs N --out DIR`.

GET distils a deterministic sampler: each pair is the initial noise and the image the teacher's ODE
sampler maps it to (GET used EDM's 18-step Heun sampler; here the teacher is an isynth `diffusion` run).
A pair directory holds `pairs.json` (the manifest: teacher identity, sampler settings, token shapes and
the list of finished shards) and `shard-NNNNN.safetensors` files with `noise` (n, N, D), `target` (n, N, D)
(the teacher's output in token space, before quantisation to uint8) and `labels` (n,).

Shard i is a pure function of (teacher checkpoint, sampler, seed, i): its noise comes from a generator
seeded with (seed, i) and its labels cycle through the classes by global index. So a killed run resumes
at its first missing shard, and asking for more pairs later appends shards to the same directory. Each
shard and the manifest are written to a temporary file and renamed: never half a shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from isynth.checkpoint import CHECKPOINT, atomic_save_tensors, atomic_write_text, read_json
from isynth.errors import IsynthError

MANIFEST = "pairs.json"
FORMAT = "isynth-pairs/1"
TEACHER_PARADIGMS = ("diffusion",)  # paradigms with a deterministic noise -> image map (`sample_from`)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _shard_noise(seed: int, index: int, shard_size: int, seq_len: int, token_dim: int) -> torch.Tensor:
    """The full shard's noise (shard_size, N, D): a partial last shard is a prefix of the full one."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return torch.randn(shard_size, seq_len, token_dim, generator=gen)


def generate_pairs(teacher_dir: Path, num_pairs: int, out: Path, sampling=None, seed: int = 0,
                   shard_size: int = 1024, use_ema: bool = True, progress: bool = True) -> dict:
    """Generate (or resume, or extend to) `num_pairs` teacher pairs in `out`; returns the manifest."""
    from isynth.runs import load_trained

    if num_pairs < 1:
        raise IsynthError(f"--num-pairs must be >= 1, got {num_pairs}")
    if shard_size < 1:
        raise IsynthError(f"--shard-size must be >= 1, got {shard_size}")
    teacher_dir, out = Path(teacher_dir), Path(out)
    model, dataset, meta = load_trained(teacher_dir, use_ema=use_ema)
    if model.run.paradigm not in TEACHER_PARADIGMS:
        raise IsynthError(f"{teacher_dir} is a {model.run.paradigm!r} run; a pair teacher must be a "
                          f"{' or '.join(map(repr, TEACHER_PARADIGMS))} run (a deterministic ODE sampler)")
    s = model.sampling_or_default(sampling)
    identity = {
        "run_dir": str(teacher_dir.resolve()), "paradigm": model.run.paradigm, "step": meta["step"],
        "train_flops": meta["train_flops"], "checkpoint_sha256": _sha256(teacher_dir / CHECKPOINT), "ema": use_ema,
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
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)
    dev = model.device
    while manifest["num_pairs"] < num_pairs:
        shards = manifest["shards"]
        if shards and shards[-1]["count"] < shard_size:  # extend a partial last shard: regenerate it whole
            manifest["num_pairs"] -= shards.pop()["count"]
        i, start = len(shards), manifest["num_pairs"]
        count = min(shard_size, num_pairs - start)
        noise = _shard_noise(seed, i, shard_size, model.seq_len, model.token_dim)[:count]
        labels = (torch.arange(start, start + count) % dataset.num_classes).long()
        t0 = time.perf_counter()
        target = torch.cat([model.sample_from(noise[j:j + s.batch_size].to(dev), labels[j:j + s.batch_size].to(dev), s).cpu()
                            for j in range(0, count, s.batch_size)])
        seconds = time.perf_counter() - t0
        atomic_save_tensors(out / _shard_name(i), {"noise": noise.contiguous(), "target": target.contiguous(),
                                                    "labels": labels})
        shards.append({"file": _shard_name(i), "count": count, "seconds": round(seconds, 3)})
        manifest["num_pairs"] = start + count
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if progress:
            print(f"{out}: {manifest['num_pairs']}/{num_pairs} pairs ({count / seconds:.1f} pairs/s)")
    return manifest


def _resume_manifest(out: Path, fresh: dict) -> dict:
    """The manifest to continue: `fresh` for a new directory, the saved one if it has the same teacher,
    sampler and layout; anything else is an error (never mix pairs of two teachers)."""
    path = out / MANIFEST
    if not path.is_file():
        if out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if not p.name.startswith("."))):
            raise IsynthError(f"{out} exists and is not a pair directory (no {MANIFEST}); use a new --out")
        return fresh
    saved = read_manifest(out)
    for key in ("teacher", "sampling", "seed", "shard_size", "seq_len", "token_dim"):
        if saved.get(key) != fresh[key]:
            raise IsynthError(f"{out} holds pairs with a different {key} (teacher checkpoint, sampler, seed or "
                              f"shard size changed); use a new --out directory")
    return saved


def read_manifest(pairs_dir: Path) -> dict:
    path = Path(pairs_dir) / MANIFEST
    if not path.is_file():
        raise IsynthError(f"{pairs_dir} is not a pair directory (no {MANIFEST}); make one with `isynth pairs`")
    manifest = read_json(path, "pair manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IsynthError(f"{path}: not an isynth pair manifest (format {FORMAT})")
    if manifest.get("num_pairs", 0) < 1:
        raise IsynthError(f"{pairs_dir} holds zero pairs")
    return manifest


@dataclass(frozen=True)
class Pairs:
    noise: torch.Tensor    # (P, N, D)
    target: torch.Tensor   # (P, N, D)
    labels: torch.Tensor   # (P,)
    manifest: dict


def check_pairs_fit(manifest: dict, where: str, seq_len: int, token_dim: int, image_shape) -> None:
    """Pairs must come from the same token grid and image size as the student (GET) that trains on them."""
    got = (manifest["seq_len"], manifest["token_dim"], tuple(manifest["image_shape"]))
    want = (seq_len, token_dim, tuple(image_shape))
    if got != want:
        raise IsynthError(f"{where}: pairs are for {got[0]} tokens of size {got[1]} from {list(got[2])} images, "
                          f"but this run has {want[0]} tokens of size {want[1]} from {list(want[2])} images "
                          "(another resolution or tokenizer)")


def load_pairs(pairs_dir: Path) -> Pairs:
    pairs_dir = Path(pairs_dir)
    manifest = read_manifest(pairs_dir)
    noise, target, labels = [], [], []
    n, d = manifest["seq_len"], manifest["token_dim"]
    for shard in manifest["shards"]:
        path = pairs_dir / shard["file"]
        try:
            t = load_file(path)
        except (SafetensorError, OSError) as e:
            raise IsynthError(f"{path}: missing or corrupt pair shard ({type(e).__name__})") from None
        c = shard["count"]
        shapes = {k: tuple(t[k].shape) if k in t else None for k in ("noise", "target", "labels")}
        if shapes != {"noise": (c, n, d), "target": (c, n, d), "labels": (c,)}:
            raise IsynthError(f"{path}: shard arrays {shapes} do not match the manifest ({c} pairs of {n}x{d})")
        noise.append(t["noise"].float())
        target.append(t["target"].float())
        labels.append(t["labels"].long())
    return Pairs(torch.cat(noise), torch.cat(target), torch.cat(labels), manifest)
