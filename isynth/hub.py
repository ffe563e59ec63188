"""Hugging Face Hub-format folders of trained runs: `isynth export RUN --out DIR` and `isynth.from_pretrained`.

An exported folder is usable without the training data. It holds
- `config.json`: the run's RunConfig (its `tokenizer.path`, where it has one, relative to the folder) and an
  `export` section with what the dataset would otherwise supply, the image shape and the conditions (attribute
  names, their values, held-out classes), and the checkpoint the weights came from (step, FLOPs, SHA-256);
- `model.safetensors`: the EMA weights, the paradigm's state dict (no optimizer state, no pickle);
- `README.md`: the model card (`isynth.hubcard`);
- `tokenizer/`: a learned tokenizer's manifest and weights, or a pretrained diffusers VAE's config and weights.

Loading checks a folder as a checkpoint is checked: the config through `run_from_dict`, every tensor's name,
shape, dtype and finiteness through `load_weights`; a problem is one IsynthError naming the file. A name that is
not a local folder is a Hub repository id, read by `huggingface_hub.snapshot_download`, which serves its cache
offline (HF_HUB_OFFLINE=1 or local_files_only=True).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.distributed as dist
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file

from isynth.checkpoint import CHECKPOINT, CONFIG, check_meta, load_weights
from isynth.conditions import Conditions
from isynth.config import RunConfig
from isynth.data import ImageDataset
from isynth.errors import IsynthError
from isynth.files import atomic_save_tensors, atomic_write_text, new_directory, read_json, sha256_file, writer_lock
from isynth.hardware import default_device
from isynth.hubcard import model_card
from isynth.paradigms import build_paradigm, run_from_dict
from isynth.paradigms.base import Paradigm
from isynth.runs import load_trained
from isynth.tokenizers.build import build_tokenizer
from isynth.tokenizers.store import MANIFEST, read_manifest

FORMAT = "isynth-export/1"
WEIGHTS, CARD, TOKENIZER = "model.safetensors", "README.md", "tokenizer"
COMMAND = "command.txt"  # in a run directory: the `isynth train` command lines that trained it
METRICS = "metrics.json"  # in a run directory, written by `isynth eval`
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # a diffusers save_pretrained folder
HUB_FILES = [CONFIG, WEIGHTS, CARD, f"{TOKENIZER}/*"]  # what is fetched from a Hub repository


@dataclass(frozen=True)
class Exported:
    """An exported folder's config: stands in for the dataset where sampling needs it (`conditions`)."""

    folder: Path
    run: RunConfig
    image_shape: tuple[int, int, int]
    conditions: Conditions
    meta: dict  # the checkpoint's step, total_steps, train_flops, elapsed_s and sha256

    @property
    def num_classes(self) -> int:
        return self.conditions.num_classes


# --- the command that made a run -----------------------------------------------------------------------------

def read_commands(run_dir: Path) -> list[str]:
    """The `isynth train` command lines recorded in RUN/command.txt ([] for runs made before it existed)."""
    path = Path(run_dir) / COMMAND
    if not path.is_file():
        return []
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise IsynthError(f"{path}: unreadable ({type(e).__name__})") from None


def record_command(run_dir: Path, command: str) -> None:
    """Add `command` to RUN/command.txt (atomically), one line per `isynth train` that trained the run; a line
    equal to the last is not repeated, as re-running a run's command resumes or leaves it. Rank 0 only."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    command = " ".join(command.splitlines())
    lines = read_commands(run_dir)
    if lines[-1:] != [command]:
        atomic_write_text(Path(run_dir) / COMMAND, "\n".join([*lines, command]) + "\n")


# --- writing -------------------------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IsynthError(f"--out {out} exists and is not empty; export into a new directory")


def _copy_tokenizer(src: Path, kind: str, dest: Path) -> None:
    """A learned tokenizer's manifest, weights (and metrics), or a diffusers VAE folder's config and weights."""
    if kind == "vae":
        names = list(VAE_FILES)
    else:
        weights = read_manifest(src).get("weights")
        if not isinstance(weights, str) or Path(weights).name != weights:
            raise IsynthError(f"{src / MANIFEST}: 'weights' must name a file in the tokenizer directory")
        names = [MANIFEST, weights, *([METRICS] if (src / METRICS).is_file() else [])]
    dest.mkdir()
    for name in names:
        if not (src / name).is_file():
            raise IsynthError(f"{src}: no {name}, which the exported folder needs (tokenizer.kind={kind})")
        shutil.copyfile(src / name, dest / name)


def _read_metrics(run_dir: Path) -> dict | None:
    path = run_dir / METRICS
    if not path.is_file():
        return None
    metrics = read_json(path, "metrics")
    if not isinstance(metrics, dict):
        raise IsynthError(f"{path}: not a metrics object")
    return metrics


def conditions_dict(c: Conditions) -> dict:
    """The conditions as config.json holds them (read back by `read_export`)."""
    return {"names": list(c.names), "values": [list(v) for v in c.values], "heldout": [int(i) for i in c.heldout]}


def _write(tmp: Path, run_dir: Path, model: Paradigm, dataset: ImageDataset, meta: dict, sha256: str,
           out: Path) -> None:
    run, c = model.run, dataset.conditions
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_save_tensors(tmp / WEIGHTS, tensors, {"format": "pt", "isynth": FORMAT})
    tokenizer = run.tokenizer
    if tokenizer.path is not None:
        _copy_tokenizer(Path(tokenizer.path), tokenizer.kind, tmp / TOKENIZER)
        tokenizer = dataclasses.replace(tokenizer, path=TOKENIZER)
    checkpoint = {k: meta[k] for k in ("step", "total_steps", "train_flops", "elapsed_s")}
    export = {"format": FORMAT, "image_shape": list(dataset.image_shape), "conditions": conditions_dict(c),
              "checkpoint": {**checkpoint, "sha256": sha256}}
    config = {**dataclasses.replace(run, tokenizer=tokenizer).to_dict(), "export": export}
    atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = model_card(model, meta, dataset.name, _read_metrics(run_dir), read_commands(run_dir), str(out))
    atomic_write_text(tmp / CARD, card)


def export_run(run_dir: Path, out: Path) -> Path:
    """Write RUN's EMA weights, config (with what sampling needs of the dataset), tokenizer and model card into
    the new directory `out`. It is built beside `out` under a temporary name, loaded back as a check, and renamed
    into place, so a failure at any point leaves nothing; an `out` that exists and is not empty is refused."""
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    if is_exported(run_dir):
        raise IsynthError(f"{run_dir} is an exported folder already; export a run directory")
    ckpt = run_dir / CHECKPOINT
    sha256 = sha256_file(ckpt) if ckpt.is_file() else None
    model, dataset, meta = load_trained(run_dir, device=torch.device("cpu"))
    if sha256_file(ckpt) != sha256:  # a training process replaced it between the hash and the load
        raise IsynthError(f"{ckpt} changed while it was read (the run is training); export again")
    with writer_lock(out):
        _check_out(out)  # again, now that no other writer can be making it

        def write(tmp: Path) -> None:
            _write(tmp, run_dir, model, dataset, meta, sha256, out)
            load_export(tmp, device=torch.device("cpu"))  # what was written loads back
        new_directory(out, write)
    return out


# --- reading -------------------------------------------------------------------------------------------------

def _is_int(v: object, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _image_shape(v: object) -> tuple[int, int, int]:
    if not isinstance(v, list) or len(v) != 3 or not all(_is_int(x, 1) for x in v) or v[2] not in (1, 3):
        raise IsynthError(f"export.image_shape must be [H, W, C] with H, W >= 1 and C in (1, 3), got {v!r}")
    return tuple(v)


def _conditions(v: object) -> Conditions:
    names = v.get("names") if isinstance(v, dict) else None
    values = v.get("values") if isinstance(v, dict) else None
    heldout = v.get("heldout", []) if isinstance(v, dict) else None

    def strings(x: object) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(isinstance(s, str) for s in x)
    if not strings(names) or not isinstance(values, list) or len(values) != len(names) or \
            not all(strings(x) for x in values):
        raise IsynthError("export.conditions must hold 'names' (attribute names) and 'values' (a non-empty list "
                          "of value names per attribute)")
    c = Conditions(tuple(names), tuple(tuple(x) for x in values))
    if not isinstance(heldout, list) or not all(_is_int(i) and i < c.num_classes for i in heldout):
        raise IsynthError(f"export.conditions.heldout must be class ids in [0, {c.num_classes}), got {heldout!r}")
    return dataclasses.replace(c, heldout=tuple(heldout))


def read_export(folder: Path) -> Exported:
    """The checked config of an exported folder, its tokenizer path made relative to where the folder is."""
    folder = Path(folder)
    file = folder / CONFIG
    if not file.is_file():
        raise IsynthError(f"{folder} is not an exported isynth folder (no {CONFIG})")
    data = read_json(file, "config")
    section = data.get("export") if isinstance(data, dict) else None
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise IsynthError(f"{file}: not an exported isynth config (no 'export' section of format {FORMAT})")
    try:
        run = run_from_dict({k: v for k, v in data.items() if k != "export"})
        image_shape, conditions = _image_shape(section.get("image_shape")), _conditions(section.get("conditions"))
    except IsynthError as e:
        raise IsynthError(f"{file}: {e}") from None
    meta = section.get("checkpoint")
    total = meta.get("total_steps") if isinstance(meta, dict) else None
    if not _is_int(total, 1):
        raise IsynthError(f"{file}: export.checkpoint.total_steps must be an integer >= 1, got {total!r}")
    meta = check_meta(meta, total, file)
    if run.tokenizer.path is not None:
        rel = Path(run.tokenizer.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise IsynthError(f"{file}: tokenizer.path must be a directory inside the folder, got {str(rel)!r}")
        run = dataclasses.replace(run, tokenizer=dataclasses.replace(run.tokenizer, path=str(folder / rel)))
    return Exported(folder, run, image_shape, conditions, meta)


def load_export(folder: Path, use_ema: bool = True, device: torch.device | None = None
                ) -> tuple[Paradigm, Exported]:
    """The model of an exported folder (eval mode, on `device`) and the folder's config."""
    info = read_export(folder)
    if not use_ema:
        raise IsynthError(f"{info.folder} is an exported folder, which holds the EMA weights only; the raw "
                          "weights are in the run directory's checkpoint")
    file = info.folder / WEIGHTS
    if not file.is_file():
        raise IsynthError(f"{info.folder}: missing {WEIGHTS} (the model's weights)")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise IsynthError(f"{file}: corrupt or unreadable weights ({type(e).__name__})") from None
    model = build_paradigm(info.run, build_tokenizer(info.run.tokenizer, info.image_shape), info.conditions)
    load_weights(model, state, file, "EMA weights")
    return model.to(device or default_device()).eval(), info


def _looks_like_path(name: str) -> bool:
    """A Hub repository id is `name` or `owner/name`; anything else the user meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False) -> Path:
    """A local folder as it is; otherwise the snapshot of Hub repository `name_or_path` (from the cache when
    offline), fetching only the exported files."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or _looks_like_path(name):
        raise IsynthError(f"{name} is not a folder (an exported isynth folder or a Hub repository id)")
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                      allow_patterns=HUB_FILES, library_name="isynth"))
    except (OSError, ValueError) as e:  # no such repository or revision, offline without a cached copy, bad id
        first = (str(e).strip().splitlines() or [""])[0]
        raise IsynthError(f"{name}: not a local folder, and no Hub repository could be read ({type(e).__name__}: "
                          f"{first[:200]})") from None


def from_pretrained(name_or_path: str | os.PathLike, use_ema: bool = True, device: torch.device | None = None, *,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False) -> Paradigm:
    """The model of an exported folder or Hub repository, in eval mode: `model.sample(labels, model.run.sample)`
    gives tokens, `model.tokenizer.decode` images; `model.conditions` says what the class ids mean."""
    return load_export(resolve(name_or_path, revision, cache_dir, local_files_only), use_ema, device)[0]


def is_exported(path: Path) -> bool:
    """Whether `path` is an exported folder (config.json with an `export` section) rather than a run directory."""
    file = Path(path) / CONFIG
    return file.is_file() and isinstance(data := read_json(file, "config"), dict) and "export" in data


def load_exported(path: Path, use_ema: bool = True, device: torch.device | None = None
                  ) -> tuple[Paradigm, Exported, dict]:
    """`load_trained`'s (model, dataset, checkpoint metadata) for an exported folder, the folder's config in
    the dataset's place (it has the `.conditions` sampling asks for), so `isynth sample` reads either."""
    model, info = load_export(path, use_ema, device)
    return model, info, info.meta


@click.command(name="export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="A new (or empty) directory for the Hub-format folder.")
def export(run_dir, out):
    """Write RUN_DIR's EMA weights, config, tokenizer and model card as a Hugging Face Hub folder. Load it with
    isynth.from_pretrained(OUT), sample it with `isynth sample OUT`, publish it with huggingface_hub's
    upload_folder(folder_path=OUT, repo_id=...)."""
    folder = export_run(run_dir, out)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    click.echo(json.dumps({"out": str(folder), "files": files}))
