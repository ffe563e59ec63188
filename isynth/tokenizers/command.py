"""`isynth tokenizer ...`: training learned tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import click

from isynth.errors import IsynthError
from isynth.overrides import budget_overrides, dataset_overrides
from isynth.tokenizers.train import train_tokenizer
from isynth.tokenizers.trainconfig import make_config


@click.group()
def tokenizer():
    """Train learned tokenizers (vq, fsq, lfq, kl) for `tokenizer.path=DIR`."""


@tokenizer.command()
@click.argument("kind")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Tokenizer directory (re-running resumes; use it as tokenizer.path=DIR).")
@click.option("--dataset", default="shapes", show_default=True,
              help="shapes, digits, a path to an .npz (arr_0 uint8 NHWC, labels) or folder:PATH.")
@click.option("--preset", default="cpu", show_default=True, help="tiny (seconds, tests) or cpu (minutes on 2 cores).")
@click.option("--steps", type=int, default=None, help="Training budget in optimizer steps.")
@click.option("--flops", type=float, default=None, help="Training budget in training FLOPs (forward + backward).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("overrides", nargs=-1, metavar="[SECTION.FIELD=VALUE]...")
def train(kind, out, dataset, preset, steps, flops, quiet, overrides):
    """Train a KIND (vq, fsq, lfq, kl) tokenizer into --out and print its held-out metrics as JSON."""
    if dataset.startswith("latents:"):
        raise IsynthError("a tokenizer trains on images: give shapes, digits, an .npz or folder:PATH, not latents")
    cfg = make_config(kind, preset, [*dataset_overrides(dataset), *budget_overrides(steps, flops), *overrides])
    metrics = train_tokenizer(cfg, out, progress=not quiet)
    click.echo(json.dumps(metrics))
