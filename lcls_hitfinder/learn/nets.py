"""Networks: the twin-network embedder (and, later, the multi-output CNN baselines)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class TwinEmbedder(nn.Module):
    """A small CNN: thumbnail (N, 1, S, S) -> embedding (N, D). Shared by both arms of the twin."""

    def __init__(self, embed_dim: int = 32, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        if not 2 <= embed_dim <= 128:
            raise ValueError(f"embed_dim must be in [2, 128], got {embed_dim}")
        chans = [1] + [width * 2 ** min(i, 3) for i in range(depth)]
        self.features = nn.Sequential(*(_conv_block(a, b) for a, b in itertools.pairwise(chans)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], embed_dim))
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
