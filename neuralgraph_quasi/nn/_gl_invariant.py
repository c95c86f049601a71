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

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph._schema import EdgeType, NodeType, Slot
from ..symmetry._index import head_rows
from ..symmetry._memo import structural, use_structure_memo

__all__ = ["gl_invariant_view", "QK_PRODUCT", "VO_PRODUCT", "NUM_EDGE_CODES"]

#: ``edge_type`` codes of the product edges (past :class:`EdgeType`'s).
QK_PRODUCT = len(EdgeType)
VO_PRODUCT = len(EdgeType) + 1
#: Edge type codes a backbone must embed.
NUM_EDGE_CODES = len(EdgeType) + 2

_RAW = (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O)


@dataclass(frozen=True)
class _Dense:
    """Where one projection's values go in its per-head dense form ``[H, d_head, n]``
    (``values[head, pos, column] = edge_attr[sel, 0]``), and the other endpoints' node ids
    ``nodes [H, n]`` (-1: none)."""

    sel: Tensor
    head: Tensor
    pos: Tensor
    column: Tensor
    n: int
    nodes: Tensor

    def values(self, batch, num_heads: int, width: int) -> Tensor:
        values = batch.edge_attr.new_zeros(num_heads, width, self.n)
        values[self.head, self.pos, self.column] = batch.edge_attr[self.sel, 0]
        return values


def _dense(batch, etype: EdgeType, head: Tensor, num_heads: int) -> _Dense:
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
    nodes = torch.full((num_heads, n), -1, dtype=torch.long, device=h.device)
    nodes[group_head, torch.arange(groups.numel(), device=h.device) - first[group_head]] = \
        groups % batch.num_nodes
    return _Dense(sel, h, batch.node_pos[coord], column, n, nodes)


def _edges(rows: Tensor, cols: Tensor, layer: Tensor, code: int):
    """Edges ``cols[j] → rows[i]`` for every valid pair ``(h, i, j)``: the pairs (to read
    ``product[h, i, j]``), edge index, type and layer."""
    valid = (rows[:, :, None] >= 0) & (cols[:, None, :] >= 0)
    pairs = valid.nonzero().unbind(1)
    h, i, j = pairs
    dst, src = rows[h, i], cols[h, j]
    return pairs, torch.stack([src, dst]), torch.full_like(src, code), layer[dst]


@dataclass(frozen=True)
class _ViewPlan:
    """Everything of :func:`gl_invariant_view` that depends only on the structure: the dense
    layouts, the product pairs, the view's structure fields, and a memo for the view (its
    structure tensors are the same objects every call, so what is memoised on them holds)."""

    num_heads: int
    width: int
    q: _Dense
    k: _Dense
    v: _Dense
    o: _Dense
    qk_pairs: tuple[Tensor, Tensor, Tensor]
    vo_pairs: tuple[Tensor, Tensor, Tensor]
    raw: Tensor
    coord: Tensor
    fields: dict
    memo: dict


def _view_plan(batch) -> _ViewPlan | None:
    heads = (batch.node_type == NodeType.HEAD).nonzero().view(-1)
    if heads.numel() == 0:
        return None
    head = head_rows(batch, heads)
    num_heads = heads.numel()
    width = int(batch.node_pos.max()) + 1
    q, k, v, o = (_dense(batch, t, head, num_heads) for t in _RAW)
    # A_h[j, i] = Σ_a W_K[a, j] W_Q[a, i]: score weight from query input i and key input j.
    qk = _edges(k.nodes, q.nodes, batch.node_layer, QK_PRODUCT)
    vo = _edges(o.nodes, v.nodes, batch.node_layer, VO_PRODUCT)
    count = qk[2].numel() + vo[2].numel()
    fields = {"edge_index": torch.cat([batch.edge_index, qk[1], vo[1]], dim=1),
              "edge_type": torch.cat([batch.edge_type, qk[2], vo[2]]),
              "edge_layer": torch.cat([batch.edge_layer, qk[3], vo[3]]),
              "edge_kshape": torch.cat([batch.edge_kshape,
                                        batch.edge_kshape.new_ones(count, 2)])}
    for key, fill in (("edge_param", -1), ("edge_offset", -1), ("edge_role", 0),
                      ("edge_head", -1), ("edge_pos", -1)):
        fields[key] = torch.cat([batch[key], batch[key].new_full((count,), fill)])
    raw = torch.isin(batch.edge_type, torch.tensor([int(t) for t in _RAW],
                                                   device=heads.device))
    return _ViewPlan(num_heads, width, q, k, v, o, qk[0], vo[0], raw, head >= 0, fields, {})


def gl_invariant_view(batch):
    """``batch`` with per-head ``W_Qᵀ W_K`` and ``W_O W_V`` product edges and the raw
    attention projections (values and Q/K/V biases) zeroed.

    The product edges are structural (``edge_param = -1``, ``edge_type`` :data:`QK_PRODUCT`
    or :data:`VO_PRODUCT`); the view is for metanetworks to read, not for ``to_model``.
    Attention with biases loses them (their GL-invariant combinations are not added).
    The view shares the input's other fields (read-only); its structure is built once per
    input structure, each call only computes the products.
    """
    plan = structural(batch, "gl_invariant_view", lambda: _view_plan(batch))
    if plan is None:
        return batch
    H, width = plan.num_heads, plan.width
    q, k, v, o = (d.values(batch, H, width) for d in (plan.q, plan.k, plan.v, plan.o))
    products = [(k.mT @ q)[plan.qk_pairs], (o.mT @ v)[plan.vo_pairs]]
    edge_attr = torch.where(plan.raw[:, None], 0.0, batch.edge_attr)
    width_k = edge_attr.size(1)
    new_attr = [torch.nn.functional.pad(vals[:, None], (0, width_k - 1)) for vals in products]
    out = copy.copy(batch)
    for key, value in plan.fields.items():
        out[key] = value
    out.edge_attr = torch.cat([edge_attr, *new_attr])
    x = batch.x.clone()
    x[:, Slot.BIAS] = torch.where(plan.coord, 0.0, x[:, Slot.BIAS])
    out.x = x
    use_structure_memo(out, plan.memo)
    return out
