"""The on-disk format of teacher (noise, image) pairs, which `isynth pairs` writes and GET trains on.

A pair directory holds `pairs.json` (the manifest: teacher identity, sampler settings, token shapes and
the list of finished shards) and `shard-NNNNN.safetensors` files with `noise` (n, N, D), `target` (n, N, D)
(the teacher's output in token space, before quantisation to uint8) and `labels` (n,).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from isynth.errors import IsynthError
from isynth.files import read_json

MANIFEST = "pairs.json"
FORMAT = "isynth-pairs/1"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def read_manifest(pairs_dir: Path, complete: bool = True) -> dict:
    """The pair directory's manifest; `complete`: it must hold pairs (a directory `isynth pairs` was killed in
    before its first shard holds none, and is resumed by it)."""
    path = Path(pairs_dir) / MANIFEST
    if not path.is_file():
        raise IsynthError(f"{pairs_dir} is not a pair directory (no {MANIFEST}); make one with `isynth pairs`")
    manifest = read_json(path, "pair manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IsynthError(f"{path}: not an isynth pair manifest (format {FORMAT})")
    if complete and manifest.get("num_pairs", 0) < 1:
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
