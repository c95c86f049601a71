"""Vectorised look-ups on a graph or a batch: nodes by coordinates, edges by endpoints."""

from __future__ import annotations

import torch
from torch import Tensor

from ..graph._schema import EdgeType

__all__ = ["graph_of_nodes", "encode", "find", "lookup", "edge_map", "head_of_nodes",
           "head_rows"]


def graph_of_nodes(graph) -> Tensor:
    """``[N]`` graph id of every node (zeros for a single graph)."""
    batch = getattr(graph, "batch", None)
    return batch if batch is not None else torch.zeros(graph.num_nodes, dtype=torch.long,
                                                       device=graph.x.device)


def encode(*columns: Tensor) -> Tensor:
    """Mixed-radix key of integer columns (each shifted to be non-negative)."""
    key = torch.zeros_like(columns[0])
    for col in columns:
        col = col + 1  # -1 (absent) becomes 0
        radix = int(col.max()) + 1 if col.numel() else 1
        key = key * radix + col
    return key


def find(columns: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Row of ``columns`` equal to each row of ``targets`` (rows of ``columns`` unique).

    Both are lists of equal-length integer columns; they are encoded in one radix.
    """
    both = encode(*(torch.cat([c, t]) for c, t in zip(columns, targets, strict=True)))
    n = columns[0].numel()
    return lookup(both[:n], both[n:])


def lookup(keys: Tensor, queries: Tensor) -> Tensor:
    """Position of each query in ``keys`` (all queries must occur; keys unique)."""
    order = torch.argsort(keys)
    pos = torch.searchsorted(keys[order], queries).clamp(max=keys.numel() - 1)
    found = order[pos]
    if not bool((keys[found] == queries).all()):
        raise ValueError("lookup: a target node or edge does not exist in the graph")
    return found


def edge_map(graph, node_map: Tensor) -> Tensor:
    """Edge ``e' = (type, σ(src), σ(dst))`` for every edge ``e = (type, src, dst)``."""
    src, dst = graph.edge_index
    n = graph.num_nodes
    keys = (graph.edge_type * n + src) * n + dst
    queries = (graph.edge_type * n + node_map[src]) * n + node_map[dst]
    return lookup(keys, queries)


def head_of_nodes(graph) -> Tensor:
    """``[N]`` node id of the head node each Q/K/V coordinate belongs to (-1 elsewhere)."""
    member = graph.edge_type == EdgeType.HEAD_MEMBER
    head = torch.full((graph.num_nodes,), -1, dtype=torch.long, device=graph.x.device)
    head[graph.edge_index[1, member]] = graph.edge_index[0, member]
    return head


def head_rows(graph, heads: Tensor) -> Tensor:
    """``[N]`` position in ``heads`` (head node ids) of each Q/K/V coordinate's head; -1 for
    every other node (head nodes included)."""
    row = torch.full((graph.num_nodes,), -1, dtype=torch.long, device=heads.device)
    row[heads] = torch.arange(heads.numel(), device=heads.device)
    owner = head_of_nodes(graph)
    return torch.where(owner >= 0, row[owner.clamp(min=0)], -1)
