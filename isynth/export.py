"""`isynth dataset ...`: datasets as files any tool can read."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from isynth import shapes
from isynth.config import DataConfig
from isynth.data import ImageDataset, load_dataset
from isynth.errors import IsynthError
from isynth.files import atomic_path

EXPORTABLE = ("shapes", "digits")


@click.group()
def dataset():
    """Export datasets in the ADM evaluator's .npz layout."""


def _config(name: str, num_images: int | None, out: Path, seed: int, image_size: int | None) -> DataConfig:
    """The dataset's settings; one IsynthError for the first bad argument, before anything is written."""
    if name not in EXPORTABLE:
        raise IsynthError(f"unknown dataset {name!r}: export one of {', '.join(EXPORTABLE)}")
    if num_images is not None and num_images < 1:
        raise IsynthError(f"--num-images must be >= 1, got {num_images}")
    if out.suffix != ".npz":
        raise IsynthError(f"--out must be an .npz file, got {out}")
    if out.is_dir():
        raise IsynthError(f"--out {out} is a directory; give a file name ending in .npz")
    if seed < 0:
        raise IsynthError(f"--seed must be >= 0, got {seed}")
    try:  # DataConfig checks the size (its bounds, and that only shapes takes one)
        return DataConfig(name=name, split_seed=seed, image_size=image_size)
    except IsynthError as e:
        raise IsynthError(f"--image-size {image_size}: {e}") from None


def _load(cfg: DataConfig, num_images: int | None) -> ImageDataset:
    """The dataset exactly as `isynth train --dataset NAME` sees it with the same settings."""
    if cfg.name == "digits":
        ds = load_dataset(cfg)
        total = len(ds.train_images) + len(ds.eval_images)
        if num_images is not None and num_images != total:
            raise IsynthError(f"digits has {total} images; leave out --num-images or give {total}")
        return ds
    # shapes.generate as load_dataset calls it, without DataConfig's minimum: a handful of images exports too
    n = cfg.num_images if num_images is None else num_images
    train, train_ids, held, held_ids, cond = shapes.generate(n, cfg.eval_fraction, cfg.side, cfg.split_seed)
    return ImageDataset("shapes", train, train_ids, held, held_ids, cond)


def arrays(ds: ImageDataset) -> dict[str, np.ndarray]:
    """The file's arrays: the training split, then the held-out split, with their attributes."""
    cond = ds.conditions
    labels = np.concatenate([ds.train_labels, ds.eval_labels]).astype(np.int64)  # (N,) class ids
    table = cond.class_attrs()  # (num_classes, K)
    return {
        "arr_0": np.ascontiguousarray(np.concatenate([ds.train_images, ds.eval_images])),  # (N, H, W, C) uint8
        "labels": labels,
        "split": np.repeat(np.array([0, 1], dtype=np.int64), [len(ds.train_labels), len(ds.eval_labels)]),
        "attrs": table[labels],  # (N, K)
        "attr_names": np.array(cond.names, dtype=str),
        "attr_values": np.array(json.dumps({n: list(v) for n, v in zip(cond.names, cond.values)})),
        "class_attrs": table,
        "heldout_classes": np.array(cond.heldout, dtype=np.int64),
    }


@dataset.command()
@click.argument("name", metavar="NAME")
@click.option("--num-images", type=int, default=None,
              help="Images in all, training and held-out splits together (shapes default: 12000; digits: all 1797).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output .npz file.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="shapes: the generator's seed; digits: the split's (data.split_seed).")
@click.option("--image-size", type=int, default=None, help="shapes: image side in pixels (default 32).")
def export(name, num_images, out, seed, image_size):
    """Write dataset NAME (shapes or digits) to --out as one .npz, exactly as `isynth train --dataset NAME`
    would see it with data.num_images, data.split_seed and data.image_size set to these options.

    \b
    ADM evaluator layout:
      arr_0            uint8 [N, H, W, C] images: the training split, then the held-out split
      labels           int64 [N] class ids over every combination of the attributes
    and beside it:
      split            int64 [N]: 0 training split, 1 held-out split
      attrs            int64 [N, K] each image's attribute values (indices)
      attr_names       str [K] attribute names (shapes: shape, colour, size, position; digits: class)
      attr_values      str, JSON: {attribute name: [value names]}, the names of the indices
      class_attrs      int64 [num_classes, K] the attribute values of every class id
      heldout_classes  int64 class ids never in the training split (shapes' unseen (shape, colour) pairs)
    """
    ds = _load(_config(name, num_images, out, seed, image_size), num_images)
    data = arrays(ds)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        # A file object, not a name: np.savez would append a second `.npz` to the temporary name.
        np.savez(f, **data)
    click.echo(json.dumps({"out": str(out), "dataset": name, "num_images": len(data["labels"]),
                           "train": int((data["split"] == 0).sum()), "heldout": int((data["split"] == 1).sum()),
                           "image_shape": list(ds.image_shape), "num_classes": ds.num_classes,
                           "heldout_classes": len(ds.conditions.heldout)}))
