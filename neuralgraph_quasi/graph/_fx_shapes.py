"""Shapes in a traced forward: ``x.shape``/``size``, ``view``/``reshape``, ``flatten``, global
average pooling (``mean``, adaptive and plain average pools). None of them adds graph nodes:
they change how a stream is read (its kind, spatial shape, token axis), or hand over to the
attention steps (splitting a Linear output into heads, merging heads back).
"""

from __future__ import annotations

from math import prod

from . import _fx_attention as attention
from ._fx_state import FxState
from ._fx_values import (
    Core,
    Dim,
    Heads,
    Input,
    InShape,
    Pending,
    Piece,
    TensorValue,
    Unsupported,
    axes_of,
)


def alias(st: FxState, x, **changes) -> TensorValue:
    """``x`` on the same units, read differently (``Stream.evolve(**changes)``)."""
    if isinstance(x, Input):
        raise Unsupported("pooling the model input is not supported")
    s = st.tensor(x)
    return TensorValue(s.stream.evolve(**changes), s.written, s.origin)


def adaptive_pool(st: FxState, x, size) -> TensorValue:
    s = st.tensor(x)
    n = {"conv1d": 1, "conv2d": 2}.get(s.stream.kind)
    if n is None:
        raise Unsupported(f"adaptive average pooling of a {s.stream.kind} tensor")
    size = (size,) * n if isinstance(size, int) else tuple(size)
    if len(size) != n or not all(isinstance(v, int) for v in size):
        raise Unsupported(f"adaptive pooling to output size {size} is not supported")
    return alias(st, s, spatial=size)


def mean(st: FxState, x, dims, keepdim: bool) -> TensorValue:
    """Global average pooling: over all spatial axes, or over the token axis."""
    s = st.tensor(x)
    axes = axes_of(s.stream)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        raise Unsupported(f"mean over dims {dims}")
    dims = sorted(d % len(axes) for d in dims)
    spatial = [i for i, a in enumerate(axes) if a.startswith("S")]
    if spatial and dims == spatial:
        if keepdim:
            return alias(st, s, spatial=(1,) * len(spatial))
        return alias(st, s, kind="vector", spatial=None)
    if s.stream.tokens and dims == [axes.index("T")] and not keepdim:
        return alias(st, s, tokens=False)
    raise Unsupported(f"mean over dims {dims} of a tensor with axes {axes}: only global "
                      "average pooling (all spatial axes, or the token axis) is supported")


def flatten(st: FxState, x, start: int = 0, end: int = -1):
    """``flatten(1)`` of a feature map (or of the model input), or merging attention heads."""
    if isinstance(x, Core):
        n = len(x.axes)
        if start % n == n - 2 and end % n == n - 1:
            return attention.merge(x, None)
        raise Unsupported(f"flatten({start}, {end}) of attention heads {x.axes}")
    if isinstance(x, Input):
        if start == 1 and end == -1 and x.value is None:
            x.flat = True
            return x
        raise Unsupported(f"flatten({start}, {end}) of the model input")
    s = st.tensor(x)
    n = len(axes_of(s.stream))
    if start % n != 1 or end % n != n - 1:
        raise Unsupported(f"flatten({start}, {end}) of a {s.stream.kind} tensor: only "
                          "flatten(1) (keep the batch axis) is supported")
    if s.stream.kind == "vector" and not s.stream.tokens:
        return s
    if s.stream.kind == "vector":
        raise Unsupported("flatten of a token sequence is not supported (pool over tokens "
                          "first)")
    spatial = s.stream.spatial
    meta = st.meta_shape()
    if spatial is None and meta is not None:
        spatial = tuple(meta[2:])
    return alias(st, s, kind="flat", spatial=spatial)


def shape(st: FxState, v) -> tuple | InShape:
    """``v.shape``: known sizes as ints, the others as :class:`~._fx_values.Dim`."""
    if isinstance(v, Input):
        meta = st.meta_shape()
        if meta is None:
            return InShape(owner=v)
        labels = {3: ("B", "T", None), 4: ("B", None, "S0", "S1")}.get(len(meta))
        if labels is None:
            return InShape((Dim("B"), *meta[1:]))
        return InShape(tuple(Dim(lab) if lab else size
                             for lab, size in zip(labels, meta, strict=True)))
    if isinstance(v, (Heads, Core)):
        h = v if isinstance(v, Heads) else v.q
        sizes = {"A": h.outer, "I": h.inner, "P": h.pieces}
        return tuple(sizes.get(a, Dim(a)) for a in v.axes)
    if isinstance(v, (Pending, Piece)):
        src = v.proj.src if isinstance(v, Piece) else v.src
        return tuple(Dim(a) if a != "F" else v.width for a in axes_of(src.stream))
    s = st.tensor(v)
    width = s.stream.width
    if s.stream.kind == "flat":
        width = width * prod(s.stream.spatial) if s.stream.spatial else Dim("F")
    return tuple(width if a == "F" else Dim(a) for a in axes_of(s.stream))


def reshape(st: FxState, x, shape: tuple):
    """``x.view(*shape)``: flattening to ``(batch, -1)``, splitting a Linear output into
    heads, or merging heads back."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if isinstance(x, (Pending, Piece)):
        return attention.split_heads(x, shape)
    if isinstance(x, Core):
        return attention.merge(x, shape)
    flat_args = len(shape) == 2 and (shape[0] == Dim("B") or shape[0] == -1)
    if isinstance(x, Input):
        if flat_args and x.value is None:
            x.flat = True
            return x
        raise Unsupported(f"reshape of the model input to {shape}")
    s = st.tensor(x)
    if flat_args and not s.stream.tokens:
        return flatten(st, s, 1, -1)
    raise Unsupported(f"reshape of a {s.stream.kind} tensor{' of tokens' * s.stream.tokens} "
                      f"to {shape}: only flattening to (batch, -1) or splitting a Linear "
                      "output into attention heads is supported")
