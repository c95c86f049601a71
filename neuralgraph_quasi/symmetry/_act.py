"""The action of a :class:`GroupElement` on a graph (or batch) and on a model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..graph._schema import WEIGHT_EDGE_TYPES, EdgeType, NodeType, Slot
from ._element import GroupElement
from ._index import edge_map, head_rows
from ._memo import structural

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
    M_inv, N_inv = _inverse(M), _inverse(N)
    factors = {EdgeType.ATTN_Q: M, EdgeType.ATTN_K: M_inv.mT,
               EdgeType.ATTN_V: N.mT, EdgeType.ATTN_O: N_inv}
    width = M.size(-1)
    edges, nodes = structural(graph, "gl_transform", lambda: _gl_plan(graph, head_row),
                              extra=(head_row,))
    for etype, sel, pos, group_head, inv, num_groups in edges:
        block = edge_values.new_zeros(num_groups, width, edge_values.size(1))
        block = block.index_put((inv, pos), edge_values[sel])
        block = factors[etype][group_head] @ block
        # under autocast the product may come back in a lower precision than the values
        edge_values = edge_values.index_copy(0, sel, block[inv, pos].to(edge_values.dtype))
    for etype, idx, h, pos in nodes:
        A = factors[etype]
        block = node_values.new_zeros(A.size(0), width, node_values.size(1))
        block = block.index_put((h, pos), node_values[idx])
        node_values = node_values.index_copy(0, idx, (A @ block)[h, pos].to(node_values.dtype))
    return edge_values, node_values


def _inverse(A: Tensor) -> Tensor:
    """``A⁻¹`` per head by one batched solve, in at least float32 (no half-precision
    solver). On a GPU without the singularity check, which would wait for the device: the
    factors that act there (α's, sampled elements) are invertible by construction."""
    dtype = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
    work = A.to(dtype)
    eye = torch.eye(A.size(-1), dtype=dtype, device=A.device).expand_as(work)
    if A.device.type == "cpu":
        inverse = torch.linalg.solve(work, eye)
    else:
        inverse = torch.linalg.solve_ex(work, eye)[0]
    return inverse.to(A.dtype)


def _gl_plan(graph, head_row: Tensor):
    """Index tensors of :func:`gl_transform` (structure only): per attention edge type, the
    edges, the position of their Q/K/V coordinate, their ``(head, other endpoint)`` group;
    per Q/K/V node type, the nodes, their head rows and positions."""
    n = graph.num_nodes
    src, dst = graph.edge_index
    edges = []
    for etype in (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O):
        sel = (graph.edge_type == etype).nonzero().view(-1)
        if sel.numel() == 0:
            continue
        coord, other = (src[sel], dst[sel]) if etype == EdgeType.ATTN_O else (dst[sel], src[sel])
        h, pos = head_row[coord], graph.node_pos[coord]
        groups, inv = torch.unique(h * n + other, return_inverse=True)
        edges.append((etype, sel, pos, groups // n, inv, groups.numel()))
    nodes = []
    for ntype, etype in ((NodeType.QUERY, EdgeType.ATTN_Q), (NodeType.KEY, EdgeType.ATTN_K),
                         (NodeType.VALUE, EdgeType.ATTN_V)):
        idx = (graph.node_type == ntype).nonzero().view(-1)
        if idx.numel() == 0:
            continue
        nodes.append((etype, idx, head_row[idx], graph.node_pos[idx]))
    return tuple(edges), tuple(nodes)
