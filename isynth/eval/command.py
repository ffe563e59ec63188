"""`isynth fid` (Inception metrics of an ADM-layout .npz against a reference) and `isynth score` (the domain
metrics of one against an isynth dataset), and the `--metrics` / `--inception-weights` options that `isynth
eval` shares with them.

The Inception weights are a file the user has (`--inception-weights PATH` or $ISYNTH_INCEPTION_WEIGHTS); isynth
never downloads them. Every input is checked - files readable, reference and samples of one size, the weights
file's keys and shapes - before any network runs, and `--out` is written atomically once everything is computed.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from isynth.config import DataConfig
from isynth.data import load_dataset, validate_images
from isynth.errors import IsynthError
from isynth.eval.adm import (
    READ_ERRORS,
    Images,
    check_sizes,
    dataset_reference,
    inception_metrics,
    read_reference,
    read_samples,
)
from isynth.eval.features import get_feature_net
from isynth.eval.inception import WEIGHTS_FILE, load_inception, weights_identity
from isynth.eval.metrics import evaluate_samples
from isynth.files import atomic_write_text
from isynth.hardware import default_device
from isynth.overrides import apply, dataset_overrides, parse_overrides

WEIGHTS_ENV = "ISYNTH_INCEPTION_WEIGHTS"
DEFAULT_BATCH = 64  # the ADM evaluator's batch size

WEIGHTS_OPTION = click.option(
    "--inception-weights", "inception_weights", type=click.Path(path_type=Path), envvar=WEIGHTS_ENV, default=None,
    help=f"The FID Inception-v3 weights file ({WEIGHTS_FILE}, or a .safetensors copy); default ${WEIGHTS_ENV}. "
         "Never downloaded.")
METRICS_OPTION = click.option(
    "--metrics", "metrics", type=click.Choice(["domain", "inception"]), default="domain", show_default=True,
    help="domain: the attribute-network metrics; inception: those plus FID, sFID, IS and precision/recall in "
         "the ADM evaluator's conventions against the dataset's held-out split (needs --inception-weights).")
BATCH_OPTION = click.option("--batch-size", type=int, default=DEFAULT_BATCH, show_default=True,
                            help="Images per Inception forward pass.")
OUT_OPTION = click.option("--out", "out", type=click.Path(path_type=Path), default=None,
                          help="Also write the JSON to this file (atomically).")


def weights_for(metrics: str, path: Path | None) -> Path | None:
    """The weights file `--metrics` needs: None for domain metrics; for inception, the given path or an error."""
    if metrics != "inception":
        return None
    if path is None:
        raise IsynthError(f"--metrics inception needs the Inception weights: give --inception-weights PATH or set "
                          f"{WEIGHTS_ENV} (the file {WEIGHTS_FILE}; isynth never downloads it)")
    return path


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise IsynthError(f"--batch-size must be >= 1, got {batch_size}")


def _emit(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2)
    if out is not None:
        atomic_write_text(out, text + "\n")
    click.echo(text)


def _labelled_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and class ids of an ADM-layout .npz: labels in `labels` (isynth) or `arr_1` (guided-diffusion's
    image_sample.py)."""
    samples = read_samples(path)  # checks the file and arr_0 first, with one clear line each
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            key = next((k for k in ("labels", "arr_1") if k in f.files), None)
            if key is None:
                raise IsynthError(f"{path}: no class labels (`labels` or `arr_1`, int [N]); the domain metrics "
                                  "score each sample against the class it was asked for")
            images, labels = np.asarray(f["arr_0"]), np.asarray(f[key])
    except READ_ERRORS as e:  # e.g. labels stored as pickled objects, which are never loaded
        raise IsynthError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    validate_images(images, labels, samples.source)
    return images, labels.astype(np.int64)


@click.command()
@click.argument("samples", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path))
@WEIGHTS_OPTION
@BATCH_OPTION
@OUT_OPTION
def fid(samples, reference, inception_weights, batch_size, out):
    """FID, sFID, Inception score and precision/recall of SAMPLES.npz (ADM layout: arr_0 uint8 [N, H, W, C])
    against REFERENCE.npz: an ADM reference batch (arr_0, optionally mu, sigma, mu_s, sigma_s) or a statistics
    file (mu and sigma; FID and, with mu_s and sigma_s, sFID only). Prints JSON."""
    _check_batch(batch_size)
    path = weights_for("inception", inception_weights)
    images, ref = read_samples(samples), read_reference(reference)
    check_sizes(images, ref)
    net = load_inception(path, default_device())
    _emit({**inception_metrics(net, images, ref, batch_size), "samples": str(samples), **weights_identity(path)},
          out)


@click.command()
@click.argument("samples", type=click.Path(path_type=Path))
@click.option("--dataset", default=None,
              help="digits (default), shapes, a path to an .npz (arr_0, labels), folder:PATH or latents:DIR.")
@METRICS_OPTION
@WEIGHTS_OPTION
@BATCH_OPTION
@OUT_OPTION
@click.argument("overrides", nargs=-1, metavar="[data.FIELD=VALUE]...")
def score(samples, dataset, metrics, inception_weights, batch_size, out, overrides):
    """Score SAMPLES.npz (ADM layout: arr_0 uint8 [N, H, W, C], class ids in labels or arr_1) against a
    dataset with the domain metrics of `isynth eval` (FD, precision/recall, class accuracy, ...; the held-out
    split is the reference), and with --metrics inception the Inception metrics too. Prints JSON."""
    _check_batch(batch_size)
    parsed = parse_overrides([*dataset_overrides(dataset), *overrides])
    bad = [k for k in parsed if not k.startswith("data.")]
    if bad:
        raise IsynthError(f"isynth score takes data.* settings, not {bad[0]}")
    path = weights_for(metrics, inception_weights)
    images, labels = _labelled_samples(samples)
    data = load_dataset(apply(DataConfig(), {k.removeprefix("data."): v for k, v in parsed.items()}, "data."))
    if images.shape[1:] != data.image_shape:
        raise IsynthError(f"{samples}: images are {list(images.shape[1:])} [H, W, C] but dataset {data.name!r} has "
                          f"{list(data.image_shape)}; score samples against the data they imitate")
    net = None if path is None else load_inception(path, default_device())
    result = {"samples": str(samples), "dataset": data.name,
              **evaluate_samples(images, labels, data, get_feature_net(data))}
    if net is not None:
        result["inception"] = {**inception_metrics(net, Images.from_array(images, str(samples)),
                                                   dataset_reference(data), batch_size),
                               **weights_identity(path)}
    _emit(result, out)
