"""Hand-written attention in a traced forward: ``q``, ``k``, ``v`` ``Linear`` projections split
into heads, ``softmax(q kᵀ) v`` (or ``F.scaled_dot_product_attention``), heads merged back and
fed to an output ``Linear``. Each step returns the next stage (see ``_fx_values``); anything
else raises :class:`~._fx_values.Unsupported`. Only the output projection emits graph nodes
(:func:`emit_attention`), with the same builder as ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from torch import nn

from ._builder import Builder, Stream
from ._converters import _attention, _Proj
from ._fx_values import (
    Core,
    Dim,
    Heads,
    Input,
    Merged,
    Pending,
    Probs,
    Scores,
    TensorValue,
    Unsupported,
    axes_of,
    describe,
)


def split_heads(p: Pending, shape: tuple) -> Heads:
    """``p.view(*shape)``: the feature axis split into ``(outer, inner)``."""
    axes = axes_of(p.src.stream)
    width = p.module.out_features
    if axes[-1] != "F" or len(shape) != len(axes) + 1:
        raise Unsupported(f"view of a Linear output {axes} as {shape}: only splitting the "
                          "feature axis into (heads, head_dim) is supported")
    lead, (outer, inner) = shape[:-2], shape[-2:]
    if shape.count(-1) > 1:
        raise Unsupported(f"view as {shape}: several -1")
    for label, arg in zip(axes[:-1], lead, strict=True):
        if arg != -1 and arg != Dim(label):
            raise Unsupported(f"view of a Linear output {axes} as {shape}: the leading "
                              "sizes must be the tensor's own")
    if outer == -1 and isinstance(inner, int) and inner > 0 and width % inner == 0:
        outer = width // inner
    if inner == -1 and isinstance(outer, int) and outer > 0 and width % outer == 0:
        inner = width // outer
    if not (isinstance(outer, int) and isinstance(inner, int) and outer * inner == width):
        raise Unsupported(f"view of a Linear output of width {width} as {shape}")
    if p.claimed or p.out is not None:
        raise Unsupported(f"the output of Linear {p.path!r} is split into heads twice, or "
                          "also used elsewhere")
    if not p.src.stream.tokens:
        raise Unsupported("attention heads over a tensor without a token axis")
    p.claimed = True
    return Heads(p, outer, inner, (*axes[:-1], "A", "I"))


def permute(x, order) -> Heads | Core:
    if not isinstance(x, (Heads, Core)):
        if isinstance(x, (TensorValue, Pending, Input)):
            raise Unsupported(f"transposing {describe(x)} is not supported (only attention "
                              "heads may be transposed)")
        raise Unsupported(f"transposing {describe(x)}")
    axes = x.axes
    new = tuple(axes[i % len(axes)] for i in order)
    if sorted(new) != sorted(axes):
        raise Unsupported(f"permutation {order} of axes {axes}")
    if isinstance(x, Heads):
        return Heads(x.proj, x.outer, x.inner, new)
    return Core(x.q, x.k, x.v, new)


def transpose(x, a: int, b: int) -> Heads | Core:
    n = len(getattr(x, "axes", ())) or 1
    order = list(range(n))
    order[a % n], order[b % n] = order[b % n], order[a % n]
    return permute(x, order)


def _layout(h: Heads, last: tuple[str, str]) -> bool:
    """Whether ``h`` is ``[batch and heads in any order, *last]``."""
    return h.axes[-2:] == last and sorted(h.axes[:-2]) == ["A", "B"]


def matmul(a, b) -> Scores | Core:
    """``q @ kᵀ`` (scores) or ``softmax(q kᵀ) @ v`` (attention output)."""
    if isinstance(a, Heads) and isinstance(b, Heads):
        if not (_layout(a, ("T", "I")) and _layout(b, ("I", "T")) and a.axes[:-2] == b.axes[:-2]):
            raise Unsupported(f"matmul of attention heads with axes {a.axes} and {b.axes}: "
                              "expected q [.., T, head_dim] @ kᵀ [.., head_dim, T] per head")
        return Scores(a, b, (*a.axes[:-2], "T", "T"))
    if isinstance(a, Probs) and isinstance(b, Heads):
        if not (_layout(b, ("T", "I")) and b.axes[:-2] == a.axes[:-2]):
            raise Unsupported(f"matmul of attention probabilities with values of axes {b.axes}")
        return _core(a.q, a.k, b)
    raise Unsupported(f"matmul of {describe(a)} and {describe(b)}: only the attention "
                      "pattern softmax(q kᵀ) v is supported")


def _core(q: Heads, k: Heads, v: Heads) -> Core:
    if len({id(q.proj), id(k.proj), id(v.proj)}) != 3:
        raise Unsupported("query, key and value must come from three different Linear "
                          "projections")
    if len({(h.outer, h.inner) for h in (q, k, v)}) != 1:
        raise Unsupported("query, key and value are split into different head shapes")
    return Core(q, k, v, v.axes)


def softmax(x, dim) -> Probs:
    if not isinstance(x, Scores):
        raise Unsupported(f"softmax of {describe(x)}: only attention scores are supported")
    if dim is None or dim % len(x.axes) != len(x.axes) - 1:
        raise Unsupported(f"softmax over dim {dim} of attention scores: only over keys "
                          "(the last axis)")
    return Probs(x.q, x.k, x.axes)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def sdpa(args, kwargs) -> Core:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` without a mask."""
    bound = dict(zip(_SDPA_ARGS, args, strict=False)) | dict(kwargs)
    if bound.get("attn_mask") is not None:
        raise Unsupported("scaled_dot_product_attention with an attn_mask is not supported")
    if bound.get("enable_gqa"):
        raise Unsupported("grouped-query attention is not supported")
    q, k, v = (bound.get(n) for n in _SDPA_ARGS[:3])
    if not all(isinstance(h, Heads) for h in (q, k, v)):
        raise Unsupported("scaled_dot_product_attention needs q, k and v split into heads "
                          "from Linear projections")
    if not all(_layout(h, ("T", "I")) and h.axes == q.axes for h in (q, k, v)):
        raise Unsupported(f"scaled_dot_product_attention on heads with axes {q.axes}, "
                          f"{k.axes}, {v.axes}")
    return _core(q, k, v)


def merge(c: Core, shape: tuple | None) -> Merged:
    """Heads back into ``[batch, tokens, width]`` by ``view``/``reshape`` to ``shape`` (or
    ``flatten``, ``shape=None``)."""
    axes = c.axes
    if axes[-2:] != ("A", "I") or axes[:-2] != ("B", "T"):
        raise Unsupported(f"merging attention heads with axes {axes}: transpose back to "
                          "(batch, tokens, heads, head_dim) first")
    if shape is not None:
        width = c.q.outer * c.q.inner
        ok = len(shape) == 3 and shape[-1] in (width, -1) and all(
            arg in (-1, Dim(label)) for arg, label in zip(shape[:2], axes[:2], strict=True))
        if not ok or shape.count(-1) > 1:
            raise Unsupported(f"merging attention heads {axes} with view/reshape {shape}")
    return Merged(c)


def _proj(b: Builder, lin: nn.Linear, path: str) -> _Proj:
    weight = b.param(f"{path}.weight", lin.weight)  # registered first: it fixes the param ids
    bias = None if lin.bias is None else b.param(f"{path}.bias", lin.bias)
    return _Proj(weight, 0, lin.in_features, bias)


def emit_attention(b: Builder, c: Core, out: nn.Linear, path: str) -> Stream:
    """The attention ``c`` with output projection ``out`` (at ``path``), added to ``b``."""
    heads, inner = c.q.outer, c.q.outer * c.q.inner
    if out.in_features != inner:
        raise Unsupported(f"output projection {path!r} reads {out.in_features} features, "
                          f"the heads give {inner}")
    projs = tuple(_proj(b, h.proj.module, h.proj.path) for h in c.heads)
    sources = tuple(h.proj.src.stream for h in c.heads)
    parent = path.rpartition(".")[0]
    return _attention(b, parent, sources, heads, projs, _proj(b, out, path), out.out_features,
                      inner)
