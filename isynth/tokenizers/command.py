"""`isynth tokenizer ...`: training learned tokenizers."""
from __future__ import annotations

import click


@click.group()
def tokenizer():
    """Train learned tokenizers (vq, fsq, lfq, kl) for `tokenizer.path=DIR`."""
