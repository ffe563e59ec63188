"""What a class id means: a tuple of attribute values.

A labelled dataset has one attribute, its class. The compositional `shapes` dataset has four (shape, colour,
size, position), and its class ids enumerate every combination, so that a sample file's `labels` are plain
ids that any tool can read while a model conditions on the attributes (the class embedding is a sum of
per-attribute embeddings, `isynth.embeddings.ClassEmbedding`) and can be asked for combinations it never saw.
Ids are mixed-radix numbers over the attributes, the first attribute varying slowest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Conditions:
    names: tuple[str, ...]                    # attribute names, e.g. ("shape", "colour", "size", "position")
    values: tuple[tuple[str, ...], ...]       # the value names of each attribute
    heldout: tuple[int, ...] = ()             # class ids kept out of the training split

    @classmethod
    def classes(cls, num_classes: int) -> Conditions:
        """One attribute, the class: labelled data (digits, .npz files, image folders)."""
        return cls(("class",), (tuple(str(i) for i in range(num_classes)),))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    @property
    def num_classes(self) -> int:
        return math.prod(self.sizes)

    def class_attrs(self) -> np.ndarray:
        """(num_classes, K) int64: the attribute values of every class id."""
        grids = np.meshgrid(*[np.arange(s) for s in self.sizes], indexing="ij")
        return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)

    def class_of(self, attrs: np.ndarray) -> np.ndarray:
        """(N, K) attribute values -> (N,) class ids."""
        ids = np.zeros(len(attrs), dtype=np.int64)
        for k, size in enumerate(self.sizes):
            ids = ids * size + attrs[:, k]
        return ids

    def describe(self, class_id: int) -> str:
        """A class id in words, e.g. `shape=circle colour=red size=small position=top-left`."""
        attrs = self.class_attrs()[class_id]
        return " ".join(f"{n}={v[a]}" for n, v, a in zip(self.names, self.values, attrs))
