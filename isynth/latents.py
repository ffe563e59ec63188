"""Cached tokens: `isynth tokenize --dataset ... --out DIR [tokenizer.path=TOKDIR ...]` encodes a dataset's
training split once, and `--dataset latents:DIR` trains on the cache instead of encoding every run.

A latents directory holds `latents.json` (the manifest: the tokenizer's identity, the source dataset's
config, shapes, the finished shards) and `shard-NNNNN.safetensors` files with `tokens` (discrete ids or
continuous vectors) or, for a VAE (`kl`, `vae`), the latents' `mean` and `std`, from which training samples a
fresh latent at every draw, as MAR caches its VAE's moments. With `data.flip` the mirror images follow the
originals. Shard i depends only on (dataset, tokenizer, i): a killed run resumes at its first missing shard;
each shard and the manifest are written to a temporary file and renamed.

The cache is tied to one tokenizer: its kind, settings and the SHA-256 of its manifest or weights. Training
with another tokenizer, or with a tokenizer whose files changed, is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from isynth.config import DataConfig, TokenizerConfig
from isynth.errors import IsynthError
from isynth.files import (
    atomic_save_tensors,
    atomic_write_text,
    new_directory,
    one_writer,
    read_json,
    remove_dead_temporaries,
)
from isynth.tokendata import SampledLatents
from isynth.tokenizers.base import Tokenizer

MANIFEST = "latents.json"
FORMAT = "isynth-latents/1"


def tokenizer_identity(cfg: TokenizerConfig) -> dict:
    """What a cache is tied to: the tokenizer's settings and a hash of the files that define it."""
    ident = dataclasses.asdict(cfg)
    if cfg.path is not None:
        root = Path(cfg.path)
        files = [root / "tokenizer.json"] if (root / "tokenizer.json").is_file() else sorted(
            p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        ident["path"], ident["files_sha256"] = str(root.resolve()), h.hexdigest()
    return ident


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@one_writer("out")
def tokenize(tokenizer: Tokenizer, tokenizer_cfg: TokenizerConfig, data_cfg: DataConfig, dataset, out: Path,
             shard_size: int = 4096, progress: bool = True) -> dict:
    """Encode (or resume encoding) the training split of `dataset` into `out`; returns the manifest."""
    if shard_size < 1:
        raise IsynthError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    images, labels = dataset.train_images, np.asarray(dataset.train_labels, dtype=np.int64)
    num = len(images) * (2 if dataset.flip else 1)
    moments = hasattr(tokenizer, "encode_moments")  # a VAE: cache means and standard deviations
    fresh = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer_cfg), "data": dataclasses.asdict(data_cfg),
             "num_tokens": num, "seq_len": tokenizer.seq_len, "token_dim": tokenizer.token_dim,
             "discrete": tokenizer.discrete, "moments": moments, "shard_size": shard_size,
             "encode_flops_per_image": tokenizer.encode_flops(), "shards": []}
    manifest = _resume(out, fresh)
    if not (out / MANIFEST).is_file():  # the directory appears with its manifest: never one a rerun refuses
        new_directory(out, lambda d: atomic_write_text(d / MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    remove_dead_temporaries(out)  # what a killed run was writing
    while len(manifest["shards"]) * shard_size < num:
        i = len(manifest["shards"])
        rows = np.arange(i * shard_size, min((i + 1) * shard_size, num))
        batch = torch.from_numpy(np.stack([images[r % len(images)] for r in rows]))  # (B, H, W, C)
        batch = torch.where(torch.from_numpy(rows >= len(images))[:, None, None, None], batch.flip(2), batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            if moments:
                mean, std = tokenizer.encode_moments(batch)
                tensors = {"mean": mean.float().cpu().contiguous(), "std": std.float().cpu().contiguous()}
            else:
                tensors = {"tokens": tokenizer.encode(batch).cpu().contiguous()}
        tensors["labels"] = torch.from_numpy(labels[rows % len(images)])
        atomic_save_tensors(out / _shard_name(i), tensors)
        manifest["shards"].append({"file": _shard_name(i), "count": len(rows),
                                   "seconds": round(time.perf_counter() - t0, 3)})
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if progress:
            print(f"{out}: {min((i + 1) * shard_size, num)}/{num} images")
    return manifest


def _resume(out: Path, fresh: dict) -> dict:
    if not (out / MANIFEST).is_file():
        if out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if not p.name.startswith("."))):
            raise IsynthError(f"{out} exists and is not a latents directory (no {MANIFEST}); use a new --out")
        return fresh
    saved = read_manifest(out, complete=False)
    for key in ("tokenizer", "data", "shard_size", "seq_len", "token_dim", "moments"):
        if saved.get(key) != fresh[key]:
            raise IsynthError(f"{out} holds latents with a different {key}; use a new --out directory")
    return saved


def read_manifest(path: Path, complete: bool = True) -> dict:
    """The manifest of a latents directory; with `complete`, only of a finished one."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise IsynthError(f"{path} is not a latents directory (no {MANIFEST}); make one with `isynth tokenize`")
    manifest = read_json(file, "latents manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IsynthError(f"{file}: not an isynth latents manifest (format {FORMAT})")
    if complete and sum(s["count"] for s in manifest.get("shards", [])) != manifest.get("num_tokens"):
        raise IsynthError(f"{path} is incomplete ({len(manifest.get('shards', []))} shards): run `isynth tokenize` "
                          "again to finish it")
    return manifest


def source_config(path: Path) -> DataConfig:
    """The config of the dataset a latents directory was made from."""
    try:
        return DataConfig(**read_manifest(path)["data"])
    except TypeError as e:
        raise IsynthError(f"{path}: its manifest's dataset config is malformed ({e})") from None


def load_latents(path: Path, tokenizer_cfg: TokenizerConfig):
    """(tokens (N, T[, D]) or `SampledLatents`, labels (N,)) of a finished cache made with this tokenizer."""
    path = Path(path)
    manifest = read_manifest(path)
    saved, own = manifest["tokenizer"], tokenizer_identity(tokenizer_cfg)
    if saved != own:
        diff = [f"{k} {saved.get(k)!r} -> {own.get(k)!r}" for k in sorted(set(saved) | set(own))
                if saved.get(k) != own.get(k)]
        raise IsynthError(f"{path} was made with another tokenizer than this run's ({'; '.join(diff[:2])}); set the "
                          "same tokenizer, or make a cache with this one (`isynth tokenize`)")
    parts: dict[str, list] = {}
    for shard in manifest["shards"]:
        file = path / shard["file"]
        try:
            t = load_file(file)
        except (SafetensorError, OSError) as e:
            raise IsynthError(f"{file}: missing or corrupt latents shard ({type(e).__name__})") from None
        for k, v in t.items():
            parts.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    tokens = SampledLatents(cat["mean"], cat["std"]) if manifest["moments"] else cat["tokens"]
    return tokens, cat["labels"]
