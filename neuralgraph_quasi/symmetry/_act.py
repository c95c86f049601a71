"""The action of a :class:`GroupElement` on a graph (or batch) and on a model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..graph._schema import WEIGHT_EDGE_TYPES, EdgeType, NodeType, Slot
from ._element import GroupElement
from ._index import edge_map, head_of_nodes

__all__ = ["act"]


def act(element: GroupElement, graph):
    """Apply ``element`` to a graph, a batch of graphs, or a model.

    The result holds the weights of an equivalent network (same function);
    the structure is unchanged and the input is not modified. A model is
    converted with :func:`~neuralgraph_quasi.to_graph`, acted on, and
    converted back with :func:`~neuralgraph_quasi.to_model`.
    """
    if isinstance(graph, nn.Module):
        from ..graph import to_graph, to_model

        return to_model(act(element, to_graph(graph)), graph)
    if element.num_nodes != graph.num_nodes:
        raise ValueError(f"element for {element.num_nodes} nodes applied to a graph of "
                         f"{graph.num_nodes} nodes")
    element = element.to(graph.x.device)
    edge_attr, x = graph.edge_attr.clone(), graph.x.clone()
    _act_gl(element, graph, edge_attr, x)
    perm = element.perm
    if not torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        edge_attr, x = edge_attr[edge_map(graph, perm)], x[perm]
    d = element.scale.to(x.dtype)
    if bool((d != 1).any()):
        src, dst = graph.edge_index
        weight = torch.isin(graph.edge_type, _weight_types(graph.edge_type.device))
        edge_attr = edge_attr * torch.where(weight, d[dst] / d[src], 1)[:, None]
        x[:, Slot.BIAS] = x[:, Slot.BIAS] * d
        x[:, Slot.GAIN] = x[:, Slot.GAIN] * d  # BatchNorm gamma; other gains have d == 1
    out = graph.clone()
    out.edge_attr, out.x = edge_attr, x
    return out


def _weight_types(device) -> Tensor:
    return torch.tensor([int(t) for t in WEIGHT_EDGE_TYPES], device=device)


def _act_gl(g: GroupElement, graph, edge_attr: Tensor, x: Tensor) -> None:
    """Per head, multiply the Q/K/V row blocks and the O column block in place."""
    if g.heads.numel() == 0:
        return
    dtype, n = edge_attr.dtype, graph.num_nodes
    row = torch.full((n,), -1, dtype=torch.long, device=x.device)
    row[g.heads] = torch.arange(g.heads.numel(), device=x.device)
    head_row = row[head_of_nodes(graph)]
    M, N = g.M.to(dtype), g.N.to(dtype)
    factors = {EdgeType.ATTN_Q: M, EdgeType.ATTN_K: torch.linalg.inv(M).mT,
               EdgeType.ATTN_V: N.mT, EdgeType.ATTN_O: torch.linalg.inv(N)}
    src, dst = graph.edge_index
    width = M.size(-1)
    for etype, A in factors.items():
        sel = (graph.edge_type == etype).nonzero().view(-1)
        coord, other = (src[sel], dst[sel]) if etype == EdgeType.ATTN_O else (dst[sel], src[sel])
        h, pos = head_row[coord], graph.node_pos[coord]
        groups, inv = torch.unique(h * n + other, return_inverse=True)
        block = edge_attr.new_zeros(groups.numel(), width, edge_attr.size(1))
        block[inv, pos] = edge_attr[sel]
        block = A[groups // n] @ block
        edge_attr[sel] = block[inv, pos]
    for ntype, A in ((NodeType.QUERY, factors[EdgeType.ATTN_Q]),
                     (NodeType.KEY, factors[EdgeType.ATTN_K]),
                     (NodeType.VALUE, factors[EdgeType.ATTN_V])):
        nodes = (graph.node_type == ntype).nonzero().view(-1)
        h, pos = head_row[nodes], graph.node_pos[nodes]
        bias = x.new_zeros(A.size(0), width)
        bias[h, pos] = x[nodes, Slot.BIAS]
        x[nodes, Slot.BIAS] = (A @ bias[..., None])[h, pos, 0]
