"""STATNN: an MLP on per-tensor weight statistics (Unterthiner et al. 2020), a baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..symmetry._memo import structural
from ._stats import NUM_STATS, tensor_statistics

__all__ = ["StatNN", "normalised_mlp"]


def normalised_mlp(norm: nn.Module, in_dim: int, hidden_dim: int, num_layers: int,
                   out_dim: int) -> nn.Sequential:
    """``norm`` then ``num_layers`` linear layers with ReLUs between them."""
    layers: list[nn.Module] = [norm]
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim,
                                out_dim if last else hidden_dim))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StatNN(nn.Module):
    r"""Predict from the statistics of a network's weight and bias tensors.

    "Predicting Neural Network Accuracy from Weights" (Unterthiner et al. 2020): for
    each parameter tensor, its mean, variance and quantiles 0/.25/.5/.75/1
    (:func:`~neuralgraph_quasi.nn.tensor_statistics`), concatenated in parameter order,
    standardised by a batch norm and read by an MLP. The statistics of a tensor do not
    depend on the order of its entries, so the prediction is invariant to permutations
    (and re-indexing); scalings and sign flips change it.

    Args:
        num_tensors: parameter tensors per network (every graph of a batch must have
            this many: one architecture, as in a zoo).
        hidden_dim: MLP width.
        num_layers: MLP depth (linear layers).
        out_dim: outputs per network (raw: the loss applies the link).

    Shapes:
        input: a batch of ``B`` graphs; output ``[B, out_dim]``.
    """

    #: Symmetry kinds the prediction is invariant to.
    invariant_to = frozenset({"permutation", "head_permutation"})

    def __init__(self, num_tensors: int, hidden_dim: int = 256, num_layers: int = 3,
                 out_dim: int = 1) -> None:
        super().__init__()
        self.num_tensors = num_tensors
        width = num_tensors * NUM_STATS
        self.mlp = normalised_mlp(nn.BatchNorm1d(width), width, hidden_dim, num_layers, out_dim)

    def features(self, batch) -> Tensor:
        """``[B, num_tensors * 7]``: the statistics of each graph, in parameter order."""
        stats = tensor_statistics(batch)
        counts = structural(batch, "tensors_per_graph",
                            lambda: torch.bincount(stats.graph).tolist())  # checked once
        if any(c != self.num_tensors for c in counts):
            raise ValueError(f"StatNN expects {self.num_tensors} parameter tensors per graph; "
                             f"the batch has {sorted(set(counts))}")
        return stats.stats.reshape(len(counts), self.num_tensors * NUM_STATS)

    def forward(self, batch) -> Tensor:
        return self.mlp(self.features(batch).to(self.mlp[0].weight.dtype))
