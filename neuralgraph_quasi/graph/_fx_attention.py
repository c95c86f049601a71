"""Hand-written attention in a traced forward: ``q``, ``k``, ``v`` ``Linear`` projections split
into heads, ``softmax(q kᵀ) v`` (or ``F.scaled_dot_product_attention``), heads merged back and
fed to an output ``Linear``. Each step returns the next stage (see ``_fx_values``); anything
else raises :class:`~._fx_values.Unsupported`. Only the output projection emits graph nodes
(:func:`emit_attention`), with the same builder as ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ._builder import Builder, Stream
from ._converters import _attention, _Proj
from ._fx_values import (
    Core,
    Dim,
    Heads,
    Input,
    Mask,
    Merged,
    Param,
    Pending,
    Piece,
    Probs,
    Scores,
    TensorValue,
    Unsupported,
    axes_of,
    describe,
)


def _source(x: Pending | Piece) -> tuple[Pending, int, int]:
    """``(projection, first output feature, width)`` of a Linear output or a piece of it."""
    if isinstance(x, Piece):
        return x.proj, x.start, x.width
    return x, 0, x.width


def _infer(sizes: list, total: int, what: str) -> list[int]:
    """``sizes`` whose product is ``total``, with at most one unknown (``-1`` or a symbolic
    size such as ``C // h`` of an unknown ``C``) solved for. A view only runs when the
    product matches, so the solution is the size the model uses."""
    unknown = [i for i, v in enumerate(sizes) if not (isinstance(v, int) and v > 0)]
    if len(unknown) > 1:
        raise Unsupported(f"{what}: {len(unknown)} sizes unknown ({sizes}); at most one may be")
    known = 1
    for v in sizes:
        known *= v if isinstance(v, int) and v > 0 else 1
    if unknown:
        if total % known:
            raise Unsupported(f"{what}: the known sizes {sizes} do not divide {total}")
        sizes = list(sizes)
        sizes[unknown[0]] = total // known
    if known * (1 if not unknown else sizes[unknown[0]]) != total:
        raise Unsupported(f"{what}: sizes {tuple(sizes)} do not multiply to {total}")
    return sizes


def _claim(proj: Pending, start: int, is_piece: bool) -> None:
    """Heads made of ``proj``'s outputs from ``start`` on: each output is used once."""
    twice = start in proj.taken if is_piece else proj.claimed
    if twice or proj.out is not None:
        raise Unsupported(f"the output of Linear {proj.path!r} is split into heads twice, or "
                          "also used elsewhere")
    proj.claimed = True
    proj.taken.add(start)


def split_heads(p: Pending | Piece, shape: tuple) -> Heads:
    """``p.view(*shape)``: the feature axis split into ``(heads, head_dim)``, or a fused
    q/k/v output into ``(pieces, heads, head_dim)``."""
    proj, start, width = _source(p)
    axes = axes_of(proj.src.stream)
    lead = len(axes) - 1
    if axes[-1] != "F" or len(shape) not in (lead + 2, lead + 3):
        raise Unsupported(f"view of a Linear output {axes} as {shape}: only splitting the "
                          "feature axis into (heads, head_dim), or a fused q/k/v output into "
                          "(3, heads, head_dim), is supported")
    for label, arg in zip(axes[:-1], shape[:lead], strict=True):
        if arg != -1 and arg != Dim(label):
            raise Unsupported(f"view of a Linear output {axes} as {shape}: the leading "
                              "sizes must be the tensor's own")
    if not proj.src.stream.tokens:
        raise Unsupported("attention heads over a tensor without a token axis (for a model "
                          "whose input is the token sequence, pass example_input)")
    sizes = _infer(list(shape[lead:]), width, f"view of a Linear output of width {width} "
                                              f"as {shape}")
    if isinstance(p, Piece) and len(sizes) == 3:
        raise Unsupported(f"view of a piece of Linear {proj.path!r} as {shape}: a piece is "
                          "one of q, k, v already")
    *pieces, outer, inner = sizes
    _claim(proj, start, isinstance(p, Piece))
    if pieces:
        return Heads(proj, outer, inner, (*axes[:-1], "P", "A", "I"), start, pieces[0])
    return Heads(proj, outer, inner, (*axes[:-1], "A", "I"), start)


def cut(x, sizes, dim: int, how: str) -> tuple[Piece, ...]:
    """``x.split(sizes, dim)`` / ``x.chunk(n, dim)`` (``how``) of a Linear output along its
    features: the pieces of a fused q/k/v projection."""
    if not isinstance(x, Pending):
        raise Unsupported(f"{how} of {describe(x)}: only a Linear output may be cut, into the "
                          "q, k, v of a fused projection (anything else would need one graph "
                          "stream per piece)")
    axes = axes_of(x.src.stream)
    if not isinstance(dim, int) or dim % len(axes) != len(axes) - 1:
        raise Unsupported(f"{how} along dim {dim} of a Linear output {axes}: only along the "
                          "feature axis")
    width = x.width
    if how == "chunk":
        if not isinstance(sizes, int) or sizes <= 0 or width % sizes:
            raise Unsupported(f"chunk of a Linear output of width {width} into {sizes}: only "
                              "into equal pieces")
        sizes = [width // sizes] * sizes
    elif isinstance(sizes, int):
        if sizes <= 0 or width % sizes:
            raise Unsupported(f"split of a Linear output of width {width} into pieces of "
                              f"{sizes}: only into equal pieces")
        sizes = [sizes] * (width // sizes)
    sizes = list(sizes)
    if not all(isinstance(v, int) for v in sizes) or sum(sizes) != width:
        raise Unsupported(f"split of a Linear output of width {width} into {sizes}")
    if x.claimed or x.out is not None:
        raise Unsupported(f"the output of Linear {x.path!r} is cut twice, or also used "
                          "elsewhere")
    x.claimed = True
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(Piece(x, a, n) for a, n in zip(starts, sizes, strict=True))


def unbind(x, dim: int = 0) -> tuple[Heads, ...]:
    """``qkv.unbind(dim)`` of fused heads along their pieces axis."""
    if not isinstance(x, Heads) or "P" not in x.axes:
        raise Unsupported(f"unbind of {describe(x)}: only of fused q/k/v heads along the axis "
                          "of size 3 that indexes q, k and v")
    if not isinstance(dim, int) or x.axes[dim % len(x.axes)] != "P":
        raise Unsupported(f"unbind along dim {dim} of heads with axes {x.axes}: only along "
                          "the axis that indexes q, k and v")
    return tuple(piece(x, i) for i in range(x.pieces))


def piece(x: Heads, i: int) -> Heads:
    """``qkv[i]``: piece ``i`` of fused heads whose first axis indexes the pieces."""
    if not isinstance(i, int) or not -x.pieces <= i < x.pieces:
        raise Unsupported(f"index {i!r} into fused heads of {x.pieces} pieces")
    i %= x.pieces
    axes = tuple(a for a in x.axes if a != "P")
    proj = x.proj
    start = x.start + i * x.width
    if start in proj.taken and start != x.start:
        raise Unsupported(f"piece {i} of the fused output of Linear {proj.path!r} is taken "
                          "twice")
    proj.taken.add(start)
    return Heads(proj, x.outer, x.inner, axes, start)


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
    return replace(x, axes=new)


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
        return _core(a.q, a.k, b, a.mask)
    raise Unsupported(f"matmul of {describe(a)} and {describe(b)}: only the attention "
                      "pattern softmax(q kᵀ) v is supported")


def _core(q: Heads, k: Heads, v: Heads, mask: str = "") -> Core:
    for h in (q, k, v):
        if "P" in h.axes:
            raise Unsupported(f"attention on fused heads with axes {h.axes}: take q, k and v "
                              "apart first (unbind or index the axis of size 3)")
    if len({(id(h.proj), h.start) for h in (q, k, v)}) != 3:
        raise Unsupported("query, key and value must come from three different Linear "
                          "projections, or three different pieces of one")
    if len({(h.outer, h.inner) for h in (q, k, v)}) != 1:
        raise Unsupported("query, key and value are split into different head shapes")
    for h in (q, k, v):  # each projection's outputs are all used, each once
        used = sorted((g.start, g.width) for g in (q, k, v) if g.proj is h.proj)
        ends = [a + n for a, n in used]
        if used[0][0] != 0 or ends[-1] != h.proj.width or any(
                a != e for (a, _), e in zip(used[1:], ends[:-1], strict=True)):
            raise Unsupported(f"the outputs of Linear {h.proj.path!r} (width {h.proj.width}) "
                              f"are not exactly q, k and v (pieces {used}): every output "
                              "feature must be a query, key or value coordinate")
    return Core(q, k, v, v.axes, mask)


def softmax(x, dim) -> Probs:
    if not isinstance(x, Scores):
        raise Unsupported(f"softmax of {describe(x)}: only attention scores are supported")
    if dim is None or dim % len(x.axes) != len(x.axes) - 1:
        raise Unsupported(f"softmax over dim {dim} of attention scores: only over keys "
                          "(the last axis)")
    return Probs(x.q, x.k, x.axes, x.mask)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def sdpa(args, kwargs) -> Core:
    """``F.scaled_dot_product_attention(q, k, v, ...)``; a causal mask (``is_causal=True``)
    or an ``attn_mask`` shared by all heads keeps every attention symmetry."""
    bound = dict(zip(_SDPA_ARGS, args, strict=False)) | dict(kwargs)
    if bound.get("attn_mask") is not None:
        bound["attn_mask"] = as_mask(bound["attn_mask"])
    if bound.get("enable_gqa"):
        raise Unsupported("grouped-query attention is not supported")
    q, k, v = (bound.get(n) for n in _SDPA_ARGS[:3])
    if not all(isinstance(h, Heads) for h in (q, k, v)):
        raise Unsupported("scaled_dot_product_attention needs q, k and v split into heads "
                          "from Linear projections")
    if not all(_layout(h, ("T", "I")) and h.axes == q.axes for h in (q, k, v)):
        raise Unsupported(f"scaled_dot_product_attention on heads with axes {q.axes}, "
                          f"{k.axes}, {v.axes}")
    mask = bound.get("attn_mask")
    causal = bound.get("is_causal", False)
    if not isinstance(causal, bool):
        raise Unsupported(f"scaled_dot_product_attention with is_causal={causal!r}: only a "
                          "constant True or False")
    if causal and mask is not None:
        raise Unsupported("scaled_dot_product_attention with both attn_mask and is_causal")
    return _core(q, k, v, "causal" if causal else f"buffer {mask.name}" if mask else "")


def as_mask(v) -> Mask:
    """A buffer (possibly sliced, compared or negated) used as an attention mask. Its
    values do not enter the graph (``to_model`` keeps the template module's buffer); what
    matters is that it is the same for every batch element and head: all axes but the
    last two (query, key) must have size 1."""
    if isinstance(v, Mask):
        return v
    if not isinstance(v, Param):
        raise Unsupported(f"{describe(v)} used as an attention mask: only a buffer is "
                          "supported")
    if v.kind != "buffer":
        raise Unsupported(f"parameter {v.name!r} used as an attention mask: a learned mask "
                          "has no place in the graph (register it as a buffer)")
    shape = tuple(v.tensor.shape)
    if len(shape) < 2 or any(n != 1 for n in shape[:-2]):
        raise Unsupported(f"buffer {v.name!r} of shape {shape} used as an attention mask: "
                          "only a mask over (query, key) shared by all heads and batch "
                          "elements, of shape [T, T] or [1, 1, T, T], keeps the symmetries")
    return Mask(v.name)


def masked(scores, mask) -> Scores:
    """``scores.masked_fill(mask, value)`` or ``scores + mask``, for a head-independent mask."""
    if not isinstance(scores, Scores):
        raise Unsupported(f"masking {describe(scores)}: only attention scores may be masked")
    if not isinstance(mask, Mask):
        raise Unsupported(f"masking attention scores with {describe(mask)}: only with a mask "
                          "made from a buffer")
    if scores.mask:
        raise Unsupported(f"attention scores masked twice ({scores.mask}, then buffer "
                          f"{mask.name})")
    return replace(scores, mask=f"buffer {mask.name}")


def merge(c: Core, shape: tuple | None) -> Merged:
    """Heads back into ``[batch, tokens, width]`` by ``view``/``reshape`` to ``shape`` (or
    ``flatten``, ``shape=None``)."""
    axes = c.axes
    if axes[-2:] != ("A", "I") or axes[:-2] != ("B", "T"):
        raise Unsupported(f"merging attention heads with axes {axes}: transpose back to "
                          "(batch, tokens, heads, head_dim) first")
    if shape is not None:
        width = c.q.outer * c.q.inner
        last = shape[-1] if len(shape) == 3 else None
        # a symbolic width (C of an input whose width is unknown) can only be the heads' own
        symbolic = isinstance(last, Dim) and last.label not in axes
        ok = len(shape) == 3 and (last in (width, -1) or symbolic) and all(
            arg in (-1, Dim(label)) for arg, label in zip(shape[:2], axes[:2], strict=True))
        if not ok or shape.count(-1) > 1:
            raise Unsupported(f"merging attention heads {axes} with view/reshape {shape}")
    return Merged(c)


def _proj(b: Builder, h: Heads) -> _Proj:
    lin, path = h.proj.module, h.proj.path
    weight = b.param(f"{path}.weight", lin.weight)  # registered first: it fixes the param ids
    bias = None if lin.bias is None else b.param(f"{path}.bias", lin.bias)
    return _Proj(weight, h.start * lin.in_features, lin.in_features, bias, h.start)


def _out_proj(b: Builder, lin: nn.Linear, path: str) -> _Proj:
    weight = b.param(f"{path}.weight", lin.weight)
    bias = None if lin.bias is None else b.param(f"{path}.bias", lin.bias)
    return _Proj(weight, 0, lin.in_features, bias)


def emit_attention(b: Builder, c: Core, out: nn.Linear, path: str) -> Stream:
    """The attention ``c`` with output projection ``out`` (at ``path``), added to ``b``."""
    heads, inner = c.q.outer, c.q.outer * c.q.inner
    if out.in_features != inner:
        raise Unsupported(f"output projection {path!r} reads {out.in_features} features, "
                          f"the heads give {inner}")
    projs = tuple(_proj(b, h) for h in c.heads)
    sources = tuple(h.proj.src.stream for h in c.heads)
    parent = path.rpartition(".")[0]
    if c.mask:
        b.masks[parent or "<root>"] = c.mask
    return _attention(b, parent, sources, heads, projs, _out_proj(b, out, path),
                      out.out_features, inner)
