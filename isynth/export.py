"""`isynth dataset ...`: datasets as files any tool can read."""
from __future__ import annotations

import click


@click.group()
def dataset():
    """Export datasets in the ADM evaluator's .npz layout."""
