"""Re-indexing a graph: the same network with its nodes and edges listed in another order."""

from __future__ import annotations

import torch
from torch import Tensor

from ._index import graph_of_nodes

__all__ = ["reindex"]


def _order_within(groups: Tensor, generator) -> Tensor:
    noise = torch.rand(groups.numel(), generator=generator, dtype=torch.float64)
    return torch.argsort(groups.double() * 2 + noise)


def reindex(graph, generator: torch.Generator | None = None):
    """An isomorphic copy of ``graph`` with nodes and edges in a random order.

    This is *not* a group action on the weights: the network is the same
    (``to_model`` gives back identical parameters), only the order in which
    the graph lists it changes. Metanetworks must be equivariant to it. On a
    batch, nodes and edges are shuffled within their own graph.

    Returns:
        ``(new_graph, node_order, edge_order)`` with ``new.x == graph.x[node_order]``
        and ``new.edge_attr == graph.edge_attr[edge_order]``.
    """
    device = graph.x.device
    node_graph = graph_of_nodes(graph).cpu()
    node_order = _order_within(node_graph, generator).to(device)
    edge_order = _order_within(node_graph[graph.edge_index[0].cpu()], generator).to(device)
    new_id = torch.empty_like(node_order)
    new_id[node_order] = torch.arange(node_order.numel(), device=device)
    out = graph.clone()
    for key, value in graph.items():
        if not isinstance(value, Tensor) or key in ("ptr",):
            continue
        if key == "edge_index":
            out.edge_index = new_id[value[:, edge_order]]
        elif graph.is_node_attr(key):
            out[key] = value[node_order]
        elif graph.is_edge_attr(key):
            out[key] = value[edge_order]
    return out, node_order, edge_order
