"""Baselines beside the graph metanetworks: an MLP on the flattened weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..symmetry._memo import structural
from ._statnn import normalised_mlp

__all__ = ["FlatMLP", "flat_parameters"]


def flat_parameters(batch) -> Tensor:
    """``[B, P]``: every graph's parameter values in graph order (weights, then node slots).

    All graphs of the batch must hold the same number of values (one architecture, as
    in a zoo). The order is the graph's edge and node order, fixed by the architecture.
    """
    rows, cols, nodes, slots, order, num_graphs = structural(
        batch, "flat_parameters", lambda: _flat_plan(batch))
    values = torch.cat([batch.edge_attr[rows, cols], batch.x[nodes, slots]])
    return values[order].view(num_graphs, -1)


def _flat_plan(batch):
    """Where the values of :func:`flat_parameters` are and their order (structure only,
    memoised: boolean masks and the count check would wait for the device)."""
    length = batch.edge_kshape.prod(-1)
    k = batch.edge_attr.size(1)
    mask = (batch.edge_param >= 0)[:, None] & (
        torch.arange(k, device=length.device)[None] < length[:, None])
    rows, cols = mask.nonzero().unbind(1)
    nodes, slots = (batch.node_param >= 0).nonzero().unbind(1)
    node_graph = batch.batch if getattr(batch, "batch", None) is not None else \
        torch.zeros(batch.num_nodes, dtype=torch.long, device=batch.x.device)
    graph = torch.cat([node_graph[batch.edge_index[1, rows]], node_graph[nodes]])
    order = torch.argsort(graph, stable=True)
    counts = torch.bincount(graph)
    if bool((counts != counts[0]).any()):
        raise ValueError("FlatMLP needs graphs with the same number of parameters; the batch "
                         f"has {sorted(set(counts.tolist()))}")
    return rows, cols, nodes, slots, order, counts.numel()


class FlatMLP(nn.Module):
    """An MLP on the flattened weights of each network (no symmetry at all).

    Args:
        num_params: values per network (``flat_parameters(batch).size(1)``).
        hidden_dim: MLP width.
        num_layers: linear layers.
        out_dim: outputs per network.

    Shapes:
        input: a batch of ``B`` graphs of one architecture; output ``[B, out_dim]``.
    """

    invariant_to: frozenset[str] = frozenset()

    def __init__(self, num_params: int, hidden_dim: int = 256, num_layers: int = 3,
                 out_dim: int = 1) -> None:
        super().__init__()
        self.num_params = num_params
        self.mlp = normalised_mlp(nn.LayerNorm(num_params), num_params, hidden_dim, num_layers,
                                  out_dim)

    def forward(self, batch) -> Tensor:
        flat = flat_parameters(batch)
        if flat.size(1) != self.num_params:
            raise ValueError(f"FlatMLP was built for {self.num_params} parameters per network; "
                             f"the batch has {flat.size(1)}")
        return self.mlp(flat.to(self.mlp[1].weight.dtype))

