"""The action of a :class:`GroupElement` on a graph (or batch) and on a model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..graph._schema import WEIGHT_EDGE_TYPES, EdgeType, NodeType, Slot
from ._element import GroupElement
from ._index import edge_map, head_rows

__all__ = ["act", "gl_transform"]


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
    dtype = edge_attr.dtype
    edges, bias = gl_transform(graph, head_rows(graph, g.heads), g.M.to(dtype), g.N.to(dtype),
                               edge_attr, x[:, Slot.BIAS:Slot.BIAS + 1])
    edge_attr.copy_(edges)
    x[:, Slot.BIAS] = bias[:, 0]


def gl_transform(graph, head_row: Tensor, M: Tensor, N: Tensor, edge_values: Tensor,
                 node_values: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head GL factors acting on any per-edge and per-node values, out of place.

    Used on a graph's weights (``edge_attr`` and the bias slot) and, by the α-map, on a
    metanetwork's hidden states: every column of ``edge_values`` is transformed like a
    weight and every column of ``node_values`` like a bias. Differentiable in all inputs.

    Args:
        graph: a graph or batch (its ``edge_type``, ``edge_index``, ``node_type``, ``node_pos``).
        head_row: ``[|V|]`` row of ``M``/``N`` of each Q/K/V coordinate's head (-1 elsewhere).
        M, N: ``[H, D, D]`` factors per head (XW convention, see :class:`GroupElement`).
        edge_values: ``[|E|, C]``; node_values: ``[|V|, C']``.

    Returns:
        the transformed ``(edge_values, node_values)``: rows of head ``h`` of ``W_Q`` by
        ``M``, of ``W_K`` by ``M⁻ᵀ``, of ``W_V`` by ``Nᵀ``, columns of ``W_O`` by ``N⁻ᵀ``
        (so its row blocks by ``N⁻¹``); the inverses come from one batched solve per head.
    """
    eye = torch.eye(M.size(-1), dtype=M.dtype, device=M.device).expand_as(M)
    M_inv, N_inv = torch.linalg.solve(M, eye), torch.linalg.solve(N, eye)
    factors = {EdgeType.ATTN_Q: M, EdgeType.ATTN_K: M_inv.mT,
               EdgeType.ATTN_V: N.mT, EdgeType.ATTN_O: N_inv}
    n, width = graph.num_nodes, M.size(-1)
    src, dst = graph.edge_index
    for etype, A in factors.items():
        sel = (graph.edge_type == etype).nonzero().view(-1)
        if sel.numel() == 0:
            continue
        coord, other = (src[sel], dst[sel]) if etype == EdgeType.ATTN_O else (dst[sel], src[sel])
        h, pos = head_row[coord], graph.node_pos[coord]
        groups, inv = torch.unique(h * n + other, return_inverse=True)
        block = edge_values.new_zeros(groups.numel(), width, edge_values.size(1))
        block = block.index_put((inv, pos), edge_values[sel])
        block = A[groups // n] @ block
        edge_values = edge_values.index_copy(0, sel, block[inv, pos])
    for ntype, etype in ((NodeType.QUERY, EdgeType.ATTN_Q), (NodeType.KEY, EdgeType.ATTN_K),
                         (NodeType.VALUE, EdgeType.ATTN_V)):
        nodes = (graph.node_type == ntype).nonzero().view(-1)
        if nodes.numel() == 0:
            continue
        A = factors[etype]
        h, pos = head_row[nodes], graph.node_pos[nodes]
        block = node_values.new_zeros(A.size(0), width, node_values.size(1))
        block = block.index_put((h, pos), node_values[nodes])
        node_values = node_values.index_copy(0, nodes, (A @ block)[h, pos])
    return edge_values, node_values
