"""Synthetic models for the benchmarks: exactly P float32 parameters, cheap to evaluate.

Named by import string ``bench_models:flat_model``; the aggregator builds it as
``flat_model(input_shape=..., num_classes=..., hidden=P)``, so the parameter count
travels in ``RoundConfig.model_hidden`` (``--hidden`` on the command line).
``scripts/`` must be on ``sys.path`` (or ``PYTHONPATH``) of every process that builds
the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class FlatModel(nn.Module):
    """One parameter ``w`` of ``n_params`` elements.

    logits = x[:, :k] @ w[:k*C].view(k, C) + mean(w) * ramp. The first k*C elements act
    as a linear layer; the mean term touches every element, so the validation gradient
    v_t is dense (as for a real model) at O(P) cost, independent of the input size.
    """

    ramp: torch.Tensor  # (C,) fixed, not a parameter

    def __init__(self, in_features: int, num_classes: int, n_params: int) -> None:
        super().__init__()
        self.k = min(in_features, n_params // num_classes)
        self.num_classes = num_classes
        self.w = nn.Parameter(torch.empty(n_params).uniform_(-0.05, 0.05))
        self.register_buffer(
            "ramp", torch.linspace(-1.0, 1.0, num_classes), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C)."""
        xf = x.flatten(1)
        shift = self.w.mean() * self.ramp  # (C,)
        if self.k == 0:
            return shift.expand(xf.shape[0], -1)
        weight = self.w[: self.k * self.num_classes].view(self.k, self.num_classes)
        out: torch.Tensor = xf[:, : self.k] @ weight + shift
        return out


def flat_model(
    input_shape: Sequence[int], num_classes: int, hidden: int = 64
) -> nn.Module:
    """Factory for the aggregator: ``hidden`` is the exact number of parameters."""
    return FlatModel(math.prod(input_shape), num_classes, hidden)
