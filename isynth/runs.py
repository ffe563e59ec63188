"""Loading trained runs and generating images from them (used by sample, eval and compare)."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from isynth.backbone import Transformer
from isynth.checkpoint import (
    CHECKPOINT,
    CONFIG,
    LOG,
    check_meta,
    config_changes,
    load_checkpoint,
    load_weights,
    read_config_dict,
    remove_stale_temps,
)
from isynth.conditions import Conditions
from isynth.config import RunConfig
from isynth.data import ImageDataset, load_dataset
from isynth.errors import IsynthError
from isynth.files import atomic_write_text, new_directory
from isynth.graphs import capturing
from isynth.hardware import autocast_for, default_device
from isynth.memory import human, require
from isynth.paradigms import build_paradigm, run_from_dict
from isynth.paradigms.base import Paradigm
from isynth.tokenizers.build import build_tokenizer


def read_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig of a run directory (its config.json, every value checked)."""
    data = read_config_dict(run_dir)
    if "export" in data:  # isynth.hub's folders: weights and config, no checkpoint, log or dataset
        raise IsynthError(f"{run_dir} is a folder written by `isynth export`, not a run directory: `isynth sample "
                          f"{run_dir}` samples from it, `isynth score SAMPLES.npz` rates the samples, and "
                          f"`isynth train ... --init-from {run_dir}` fine-tunes it")
    try:
        return run_from_dict(data)
    except IsynthError as e:
        raise IsynthError(f"{Path(run_dir) / CONFIG}: {e}") from None


# The budget of a run may change between invocations (`change_budget`); every other setting must stay.
BUDGET_FIELDS = ("max_steps", "train_flops")


def _without_budget(config: dict) -> dict:
    return {**config, "train": {k: v for k, v in config["train"].items() if k not in BUDGET_FIELDS}}


def prepare_run_dir(out: Path, run: RunConfig, fill: Callable[[Path], None] | None = None) -> RunConfig | None:
    """Create `out` with config.json, and whatever `fill(directory)` writes into it before it appears (a
    fine-tuning run's first checkpoint); or check that an existing run has the same config, its budget
    aside (the trainer then applies a new one with `change_budget`). Returns the existing run's saved config,
    None for a new run."""
    out = Path(out)
    cfg_path = out / CONFIG
    if cfg_path.is_file():
        if fill is not None:
            raise IsynthError(f"{out} already holds a run; --init-from starts a new run (use a new --out, or "
                              f"re-run without --init-from to resume {out})")
        raw = read_config_dict(out)
        if raw.get("paradigm") != run.paradigm:
            raise IsynthError(f"{out} holds a run with a different config (paradigm: {raw.get('paradigm')!r} -> "
                              f"{run.paradigm!r}); use a new --out directory")
        saved = read_run_config(out)  # settings added since take their defaults
        changes = config_changes(_without_budget(saved.to_dict()), _without_budget(run.to_dict()))
        if changes:
            raise IsynthError(f"{out} holds a run with a different config ({'; '.join(changes[:3])}); "
                              "use a new --out directory")
        remove_stale_temps(out)
        return saved
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IsynthError(f"{out} exists and is not an isynth run directory; use a new --out directory")
    def write(tmp: Path) -> None:  # never a half-made run: the directory appears with its config
        atomic_write_text(tmp / CONFIG, run.to_json())
        if fill is not None:
            fill(tmp)
    new_directory(out, write)
    return None


def change_budget(out: Path, run: RunConfig, step: int, old_total: int, new_total: int) -> str | None:
    """Give the run in `out`, trained for `step` steps (its checkpoint read and checked), `run`'s budget:
    config.json is rewritten with it and a changed number of steps is logged as an event record
    (`{"step", "event": "extended" | "shortened", "from_total_steps", "to_total_steps"}`). Returns the line
    to print, or None where the number of steps stays. The steps after `step` follow the new total's
    learning-rate schedule (`trainer.lr_at`). A budget below `step` is refused before anything changes."""
    if new_total < step:
        raise IsynthError(f"{out} has trained {step} steps; a budget of {new_total} steps is below that "
                          f"(give at least --steps {step})")
    atomic_write_text(Path(out) / CONFIG, run.to_json())
    if new_total == old_total:
        return None
    event = "extended" if new_total > old_total else "shortened"
    with open(Path(out) / LOG, "a") as f:
        f.write(json.dumps({"step": step, "event": event, "from_total_steps": old_total,
                            "to_total_steps": new_total}) + "\n")
    return (f"{out}: budget {event} from {old_total} to {new_total} steps at step {step}; the learning rate "
            f"follows the {new_total}-step schedule from here")


def load_trained(run_dir: Path, use_ema: bool = True, device: torch.device | None = None
                 ) -> tuple[Paradigm, ImageDataset, dict]:
    """The run's model (EMA weights by default) in eval mode, its dataset and checkpoint metadata."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise IsynthError(f"{run_dir} has no checkpoint yet; run `isynth train` first")
    dataset = load_dataset(run.data)
    model = build_paradigm(run, build_tokenizer(run.tokenizer, dataset.image_shape), dataset.conditions)
    weights, ema, _, meta = load_checkpoint(ckpt)
    total = meta.get("total_steps") if isinstance(meta, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise IsynthError(f"{ckpt}: checkpoint metadata 'total_steps' must be an integer >= 1, got {total!r}")
    meta = check_meta(meta, total, ckpt)
    load_weights(model, ema if use_ema else weights, ckpt, "EMA weights" if use_ema else "weights")
    return model.to(device or default_device()).eval(), dataset, meta


def balanced_labels(num: int, conditions: Conditions, fixed: dict[int, int] | None = None) -> np.ndarray:
    """`num` class ids cycling through every combination of the attributes not `fixed` ({attribute index:
    value index}, which all ids keep), the first attribute fastest: with one attribute 0, 1, ..., K-1, 0, ...
    (every class equally often, as FID protocols need); on shapes every (shape, colour) pair, the held-out ones
    included, within the first 30 ids, and every class equally often over each cycle of 540."""
    fixed = fixed or {}
    free = [k for k in range(len(conditions.sizes)) if k not in fixed]
    rest = np.arange(num, dtype=np.int64) % math.prod(conditions.sizes[k] for k in free)
    attrs = np.zeros((num, len(conditions.sizes)), dtype=np.int64)  # (num, K)
    for k in free:  # mixed radix, the first free attribute the fastest digit
        attrs[:, k], rest = rest % conditions.sizes[k], rest // conditions.sizes[k]
    for k, value in fixed.items():
        attrs[:, k] = value
    return conditions.class_of(attrs)


def parse_labels(text: str, num_classes: int) -> np.ndarray:
    """'3,3,7' -> class ids (int64); IsynthError naming the first item that is not an id in [0, num_classes)."""
    items = [t.strip() for t in text.split(",")]
    out = []
    for item in items:
        if not item.isdigit() or int(item) >= num_classes:
            raise IsynthError(f"--labels: {item!r} is not a class id in [0, {num_classes})")
        out.append(int(item))
    return np.array(out, dtype=np.int64)


def parse_attrs(text: str, conditions: Conditions) -> dict[int, int]:
    """'shape=circle colour=red' -> {attribute index: value index}; IsynthError naming the first bad item
    with the valid names."""
    fixed: dict[int, int] = {}
    names = ", ".join(conditions.names)
    if not text.split():
        raise IsynthError(f"no attributes given; want NAME=VALUE items with NAME one of {names}")
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep:
            raise IsynthError(f"{item!r} is not NAME=VALUE (attributes: {names})")
        if name not in conditions.names:
            raise IsynthError(f"unknown attribute {name!r}; valid attributes: {names}")
        k = conditions.names.index(name)
        if k in fixed:
            raise IsynthError(f"attribute {name!r} given twice")
        if value not in conditions.values[k]:
            raise IsynthError(f"unknown {name} {value!r}; valid values of {name}: {', '.join(conditions.values[k])}")
        fixed[k] = conditions.values[k].index(value)
    return fixed


def sampling_precision(model: Paradigm):
    """bf16 on CUDA: every backbone stack's weights are cast to bf16 once (decoding reads all weights every
    step, so half the bytes is up to twice the speed) and the rest runs under bf16 autocast; fp32 on CPU,
    where bf16 matmuls are about 100x slower."""
    if model.device.type != "cuda":
        return nullcontext()
    for m in model.modules():
        if isinstance(m, Transformer):
            m.to(torch.bfloat16)
    return autocast_for(model.device)


def shard_seed(seed: int, index: int) -> int:
    """The generator seed of shard `index` of a sharded job seeded with `seed` (sample files, teacher pairs):
    a hash of both, so shards of nearby seeds share no stream."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def check_sampling_memory(model: Paradigm, sampling, num_images: int, image_shape: tuple[int, ...],
                          what: str) -> None:
    """Refuse sampling `num_images` held at once (a shard, an eval's samples; `image_shape` the bytes of one
    as uint8) whose bytes plus one batch's
    widest block activations cannot fit: each of the batch's rows (doubled under guidance) carries the
    sequence through a block's widest tensors, its width times (MLP ratio + 4) floats per token."""
    rows = min(sampling.batch_size, num_images) * (2 if model.unconditional_passes(sampling) else 1)
    per_row = max(((model.seq_len + 2) * t.cfg.width * 4 * (t.cfg.mlp_ratio + 4)
                   for t in model.modules() if isinstance(t, Transformer)), default=0)
    images = float(num_images) * math.prod(image_shape)
    require(what, rows * per_row + images, model.device, "lower sample.batch_size or the number of samples held "
            "at once (--shard-size for isynth sample)",
            f"{human(images)} held at once, {human(rows * per_row)} for a batch of {rows} rows")


def generate(model: Paradigm, labels: np.ndarray, sampling=None, seed: int = 0, progress: bool = False,
             desc: str = "sampling") -> tuple[np.ndarray, float]:
    """Images (uint8 NHWC) for `labels`, in batches of sampling.batch_size (default: the run's sampling
    settings); returns (images, seconds). `progress` shows a bar on a terminal (images done)."""
    s = sampling or model.run.sample
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    t0 = time.perf_counter()
    with sampling_precision(model), capturing(getattr(s, "cuda_graphs", False)), \
            tqdm(total=len(labels), desc=desc, unit="img", disable=not progress or None, leave=False) as bar:
        for i in range(0, len(labels), s.batch_size):
            lab = torch.from_numpy(labels[i:i + s.batch_size]).to(dev)
            tokens = model.sample(lab, s, generator=gen)
            tokens = tokens.float() if tokens.is_floating_point() else tokens  # bf16 under autocast on CUDA
            out.append(model.tokenizer.decode(tokens.cpu()).numpy())
            bar.update(len(lab))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(out), time.perf_counter() - t0
