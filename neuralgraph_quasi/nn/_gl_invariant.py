r"""A GL-invariant view of attention weights: per-head products instead of raw projections.

Per head ``h`` of an attention layer, the score matrix depends on ``W_Q`` and ``W_K`` only
through ``A_h = W_{Q,h}^\top W_{K,h}`` (``[d_in, d_in]``, PyTorch layout: rows of head ``h``)
and the output on ``W_V``, ``W_O`` only through ``B_h = W_{O,h} W_{V,h}`` (``[d_out, d_in]``).
Both are invariant to the head's GL pair (``W_Q → M W_Q``, ``W_K → M^{-T} W_K``;
``W_V → N^T W_V``, ``W_O[:, h] → W_O[:, h] N^{-T}``), as in Transformer-NFN's invariant
layer. :func:`gl_invariant_view` adds them to the graph as edges between the token
dimensions (``A_h[i, j]``: input ``i`` → input ``j``; ``B_h[o, i]``: input ``i`` → output
``o``; one edge per head, without the head's index) and zeroes the raw projection values
and their biases, so a metanetwork that reads the view is invariant to ``gl``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..graph._schema import EdgeType, NodeType, Slot
from ..symmetry._index import head_rows

__all__ = ["gl_invariant_view", "QK_PRODUCT", "VO_PRODUCT", "NUM_EDGE_CODES"]

#: ``edge_type`` codes of the product edges (past :class:`EdgeType`'s).
QK_PRODUCT = len(EdgeType)
VO_PRODUCT = len(EdgeType) + 1
#: Edge type codes a backbone must embed.
NUM_EDGE_CODES = len(EdgeType) + 2

_RAW = (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O)


def _dense(batch, etype: EdgeType, head: Tensor, num_heads: int, width: int):
    """Per head, the projection as ``[H, d_head, n]`` over its other endpoints (the token
    dimensions it reads or writes), with those endpoints' node ids ``[H, n]`` (-1: none)."""
    sel = (batch.edge_type == etype).nonzero().view(-1)
    src, dst = batch.edge_index[:, sel]
    coord, other = (src, dst) if etype == EdgeType.ATTN_O else (dst, src)
    h = head[coord]
    groups, local = torch.unique(h * batch.num_nodes + other, return_inverse=True)
    group_head = groups // batch.num_nodes
    first = torch.searchsorted(group_head, torch.arange(num_heads, device=h.device))
    count = torch.bincount(group_head, minlength=num_heads)
    n = int(count.max())
    column = local - first[h]
    values = batch.edge_attr.new_zeros(num_heads, width, n)
    values[h, batch.node_pos[coord], column] = batch.edge_attr[sel, 0]
    nodes = torch.full((num_heads, n), -1, dtype=torch.long, device=h.device)
    nodes[group_head, torch.arange(groups.numel(), device=h.device) - first[group_head]] = \
        groups % batch.num_nodes
    return values, nodes


def _edges(product: Tensor, rows: Tensor, cols: Tensor, layer: Tensor, code: int):
    """Edges ``cols[j] → rows[i]`` holding ``product[h, i, j]`` for every valid pair."""
    valid = (rows[:, :, None] >= 0) & (cols[:, None, :] >= 0)
    h, i, j = valid.nonzero().unbind(1)
    dst, src = rows[h, i], cols[h, j]
    return (torch.stack([src, dst]), product[h, i, j],
            torch.full_like(src, code), layer[dst])


def gl_invariant_view(batch):
    """``batch`` with per-head ``W_Qᵀ W_K`` and ``W_O W_V`` product edges and the raw
    attention projections (values and Q/K/V biases) zeroed.

    The product edges are structural (``edge_param = -1``, ``edge_type`` :data:`QK_PRODUCT`
    or :data:`VO_PRODUCT`); the view is for metanetworks to read, not for ``to_model``.
    Attention with biases loses them (their GL-invariant combinations are not added).
    """
    heads = (batch.node_type == NodeType.HEAD).nonzero().view(-1)
    if heads.numel() == 0:
        return batch
    head = head_rows(batch, heads)
    width = int(batch.node_pos.max()) + 1
    q, q_in = _dense(batch, EdgeType.ATTN_Q, head, heads.numel(), width)
    k, k_in = _dense(batch, EdgeType.ATTN_K, head, heads.numel(), width)
    v, v_in = _dense(batch, EdgeType.ATTN_V, head, heads.numel(), width)
    o, o_out = _dense(batch, EdgeType.ATTN_O, head, heads.numel(), width)
    # A_h[j, i] = Σ_a W_K[a, j] W_Q[a, i]: score weight from query input i and key input j.
    qk = _edges(k.mT @ q, k_in, q_in, batch.node_layer, QK_PRODUCT)
    vo = _edges(o.mT @ v, o_out, v_in, batch.node_layer, VO_PRODUCT)

    out = batch.clone()
    raw = torch.isin(batch.edge_type, torch.tensor([int(t) for t in _RAW],
                                                   device=heads.device))
    edge_attr = torch.where(raw[:, None], 0.0, batch.edge_attr)
    width_k = edge_attr.size(1)
    new_attr = [torch.nn.functional.pad(vals[:, None], (0, width_k - 1)) for vals in
                (qk[1], vo[1])]
    out.edge_index = torch.cat([batch.edge_index, qk[0], vo[0]], dim=1)
    out.edge_attr = torch.cat([edge_attr, *new_attr])
    out.edge_type = torch.cat([batch.edge_type, qk[2], vo[2]])
    out.edge_layer = torch.cat([batch.edge_layer, qk[3], vo[3]])
    count = qk[2].numel() + vo[2].numel()
    for key, fill in (("edge_param", -1), ("edge_offset", -1), ("edge_role", 0),
                      ("edge_head", -1), ("edge_pos", -1)):
        out[key] = torch.cat([batch[key], batch[key].new_full((count,), fill)])
    out.edge_kshape = torch.cat([batch.edge_kshape, batch.edge_kshape.new_ones(count, 2)])
    coord = head >= 0
    x = batch.x.clone()
    x[coord, Slot.BIAS] = 0.0
    out.x = x
    return out
