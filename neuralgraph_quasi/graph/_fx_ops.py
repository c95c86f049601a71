"""Elementwise operations in a traced forward: activations, arithmetic (constant factors,
symbolic sizes), residual additions, positional tables and ``torch.cat``.

Each function takes the converter's :class:`~._fx_state.FxState` and the abstract values of
the fx node's arguments, and returns the node's value.
"""

from __future__ import annotations

import operator

import torch

from . import _fx_attention as attention
from ._builder import FIXED, MIXED, Stream
from ._converters import _grid, _residual
from ._fx_state import FxState, at_layer, layer_of
from ._fx_values import (
    Dim,
    Heads,
    Input,
    Mask,
    Param,
    Pending,
    Scaled,
    Scores,
    TensorValue,
    Unsupported,
    axes_of,
    describe,
    is_num,
    resolve,
)
from ._schema import Act, EdgeType, NodeOp, NodeType


def activate(st: FxState, x, act: Act) -> TensorValue:
    if isinstance(x, Scaled):
        if act != Act.SINE:
            raise Unsupported(f"a constant factor before {act.name.lower()} cannot be held "
                              "by the graph (only sin(w0 * x), SIREN's sine, can)")
        x = x.value
    if isinstance(x, Input):
        raise Unsupported("an activation on the model input, before any layer with "
                          "weights, is not supported")
    s = st.tensor(x)
    st.mutate(s, f"the {act.name.lower()} activation")
    return st.new(st.b.activate(s.stream, act, st.path))


def arith(st: FxState, fn, a, b):
    """``fn(a, b)`` for ``fn`` among + - * // / **."""
    a, b = resolve(a), resolve(b)
    if is_num(a) and is_num(b):
        return fn(a, b)
    if (isinstance(a, (Dim, int)) and isinstance(b, (Dim, int, float))
            or isinstance(b, Dim) and is_num(a)):
        return Dim("?")
    if fn is operator.add and isinstance(a, Scores) and isinstance(b, (Mask, Param)):
        # an additive mask (0 / -inf) from a buffer
        return attention.masked(a, attention.as_mask(b))
    if fn is operator.add:
        return add(st, a, b)
    if fn is operator.mul and is_num(a):
        return _scale(b, a)
    if fn is operator.mul and is_num(b):
        return _scale(a, b)
    if fn is operator.truediv and is_num(b) and b != 0:
        return _scale(a, 1.0 / b)
    raise Unsupported(f"{fn.__name__} of {describe(a)} and {describe(b)} is not supported")


def _scale(value, factor: float):
    if isinstance(value, (Scores, Heads)):
        return value  # a constant temperature keeps every attention symmetry
    if isinstance(value, Scaled):
        return Scaled(value.value, value.factor * factor)
    if isinstance(value, (TensorValue, Pending)):
        return Scaled(value, factor)
    raise Unsupported(f"multiplying {describe(value)} by a constant is not supported")


def add(st: FxState, a, b):
    """Tuple concatenation, a positional table, or a residual addition ``out + skip``: the
    later layer's fresh output holds the sum, with residual edges from the skip."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a + b
    if isinstance(b, Param):
        return _add_positions(st, a, b)
    if isinstance(a, Param):
        return _add_positions(st, b, a)
    sa, sb = st.tensor(a), st.tensor(b)
    for attr in ("kind", "tokens", "width"):
        if getattr(sa.stream, attr) != getattr(sb.stream, attr):
            raise Unsupported(f"addition of tensors with different {attr}: "
                              f"{getattr(sa.stream, attr)} and {getattr(sb.stream, attr)}")
    holders = [v for v in (sa, sb) if st.can_hold_sum(v)]
    if not holders:
        raise Unsupported("neither operand of the addition can hold the sum (each is a "
                          "model input, already has an activation, or is read elsewhere)")
    out = max(holders, key=lambda v: int(v.stream.nodes.max()))
    skip = sb if out is sa else sa
    if skip.stream.perm == MIXED:
        raise Unsupported("a concatenation of branches as a residual skip is not supported")
    st.read(skip)
    st.mutate(out, "the addition")
    with at_layer(st.b, layer_of(st.b, out.stream.nodes)):
        s = _residual(st.b, skip.stream, out.stream, st.path)
    return st.new(s)


def _add_positions(st: FxState, x, p: Param) -> TensorValue:
    s = st.tensor(x)
    shape = tuple(p.tensor.shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if not (s.stream.kind == "vector" and s.stream.tokens and len(shape) == 2):
        raise Unsupported(f"parameter {p.name!r} of shape {tuple(p.tensor.shape)} added to "
                          "a tensor: only a positional table [T, d] (or [1, T, d]) added "
                          "to a token sequence is supported")
    num, dim = shape
    if dim != s.stream.width:
        raise Unsupported(f"positional table {p.name!r} has width {dim}, the tokens "
                          f"{s.stream.width}")
    if not st.can_hold_sum(s):
        raise Unsupported(f"positional table {p.name!r} must be added to the fresh output "
                          "of a layer with weights (no activation, not read elsewhere)")
    st.mutate(s, "adding the positional table")
    b = st.b
    with at_layer(b, 0):
        positions = b.nodes(num, NodeType.INPUT, NodeOp.INPUT, FIXED)
    pid = b.param(p.name, p.tensor, p.kind)
    t, f = _grid(num, dim)
    with at_layer(b, layer_of(b, s.stream.nodes)):
        b.edges(positions[t], s.stream.nodes[f], EdgeType.EMBEDDING, pid=pid,
                offset=t * dim + f)
    return st.new(s.stream)


def mask_op(name: str, x, *rest):
    """``mask == 0``, ``~mask``, ``mask.bool()`` ...: still a mask."""
    m = attention.as_mask(x)
    if not all(isinstance(r, (int, float, bool, str, torch.dtype, torch.device)) for r in rest):
        raise Unsupported(f"{name} of an attention mask with {rest}")
    return m


def param_slice(p: Param, index) -> Param:
    """``p[index]``: only a prefix of the token axis (a positional table cut to length)."""
    index = index if isinstance(index, tuple) else (index,)
    token_axis = 1 if p.tensor.dim() == 3 and p.tensor.size(0) == 1 else 0
    for axis, item in enumerate(index):
        full = isinstance(item, slice) and item.start in (None, 0) and item.step in (None, 1)
        if not full or (axis != token_axis and item.stop is not None):
            raise Unsupported(f"indexing parameter {p.name!r} with {index!r}: only a prefix "
                              "of its token axis (e.g. pos[:T]) is supported")
    return p


def cat(st: FxState, tensors, dim: int = 0) -> TensorValue:
    """``torch.cat`` along the feature/channel axis: a stream of mixed permutation classes."""
    vals = [st.tensor(v) for v in tensors]
    streams = [v.stream for v in vals]
    first = streams[0]
    for s in streams[1:]:
        if (s.kind, s.tokens, s.spatial) != (first.kind, first.tokens, first.spatial):
            raise Unsupported("concatenation of tensors of different kinds")
    axes = axes_of(first)
    if dim % len(axes) != axes.index("F"):
        raise Unsupported(f"concatenation along dim {dim} (axes {axes}): only along the "
                          "feature/channel axis")
    nodes = torch.cat([s.nodes for s in streams])
    if torch.unique(nodes).numel() != nodes.numel():
        raise Unsupported("a unit appears twice in the concatenation")
    parts = tuple(c for s in streams for c in (s.parts or (s.perm,)))
    stream = Stream(nodes, first.kind, MIXED, first.spatial, first.tokens,
                    any(s.has_act for s in streams), parts)
    return TensorValue(stream, torch.cat([v.written for v in vals]), st.node.name)
