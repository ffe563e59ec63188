"""The directory of a learned tokenizer (`isynth tokenizer train`): `tokenizer.json`, the manifest (format,
kind, image shape, token grid, the training config and data, the weights' SHA-256), and the weights. This
module only reads the manifest, so that a run's config can learn the tokenizer's kind without loading it."""
from __future__ import annotations

from pathlib import Path

from isynth.config import LEARNED_KINDS
from isynth.errors import IsynthError
from isynth.files import read_json

MANIFEST = "tokenizer.json"
FORMAT = "isynth-tokenizer/1"


def read_manifest(path: str | Path) -> dict:
    """The manifest of a learned tokenizer directory, or one clear error."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise IsynthError(f"{path} is not an isynth tokenizer directory (no {MANIFEST}); train one with "
                          "`isynth tokenizer train KIND --out DIR`, or use tokenizer.kind=vae for a diffusers folder")
    manifest = read_json(file, "tokenizer manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in LEARNED_KINDS:
        raise IsynthError(f"{file}: not an isynth tokenizer manifest (format {FORMAT})")
    return manifest
