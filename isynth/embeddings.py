"""Input embeddings shared by paradigms: class labels with a null class for classifier-free guidance."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassEmbedding(nn.Module):
    """Embedding of `num_classes` labels plus one null label (index num_classes) for CFG.

    During training, labels are replaced by the null label with probability `dropout` so the same
    network also models p(x) (Ho & Salimans 2022); sampling uses the null label for the unconditional
    half of the doubled batch.
    """

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.trunc_normal_(self.table.weight, std=0.02)

    @property
    def null(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.null), labels)
        return self.table(labels)  # (B, C)


def learned_positions(num: int, width: int) -> nn.Parameter:
    """A learned position table (1, num, width), initialised like ViT/GPT-2."""
    p = nn.Parameter(torch.zeros(1, num, width))
    nn.init.trunc_normal_(p, std=0.02)
    return p
