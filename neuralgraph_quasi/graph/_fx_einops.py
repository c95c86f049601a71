"""``einops.rearrange`` in a traced forward, for attention heads: ``'b n (h d) -> b h n d'``
splits a Linear output (or a piece of one) into heads, ``'b n (three h d) -> three b h n d'``
a fused q/k/v output, ``'b h n d -> b n (h d)'`` merges heads back, and a pattern of single
axes on both sides permutes heads. Each is translated into the ``view``/``permute`` steps
of :mod:`._fx_attention`; anything else raises :class:`~._fx_values.Unsupported`.
"""

from __future__ import annotations

import re

from . import _fx_attention as attention
from ._fx_values import Core, Dim, Heads, Pending, Piece, Unsupported, axes_of, describe

_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z_][A-Za-z0-9_]*|\S+)")


def _side(text: str, pattern: str) -> list[str | tuple[str, ...]]:
    """The axes of one side: names, and tuples of names for parenthesised groups."""
    entries: list[str | tuple[str, ...]] = []
    group: list[str] | None = None
    for token in _TOKEN.findall(text):
        if token == "(":
            if group is not None:
                raise Unsupported(f"rearrange pattern {pattern!r}: nested groups")
            group = []
        elif token == ")":
            if group is None:
                raise Unsupported(f"rearrange pattern {pattern!r}: unbalanced parentheses")
            entries.append(tuple(group))
            group = None
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
            (entries if group is None else group).append(token)
        else:
            raise Unsupported(f"rearrange pattern {pattern!r}: {token!r} (ellipsis, numbers "
                              "and anonymous axes) is not supported; name every axis")
    if group is not None:
        raise Unsupported(f"rearrange pattern {pattern!r}: unbalanced parentheses")
    return entries


def _parse(pattern: str):
    if not isinstance(pattern, str) or pattern.count("->") != 1:
        raise Unsupported(f"rearrange pattern {pattern!r}: expected 'left -> right'")
    left, right = pattern.split("->")
    return _side(left, pattern), _side(right, pattern)


def rearrange(x, pattern: str, **lengths):
    """``einops.rearrange(x, pattern, **lengths)`` on the attention stages."""
    left, right = _parse(pattern)
    if isinstance(x, (Pending, Piece)):
        return _split(x, pattern, left, right, lengths)
    if isinstance(x, (Heads, Core)):
        if all(isinstance(e, str) for e in left + right):
            return attention.permute(x, _order(pattern, left, right))
        if isinstance(x, Core):
            return _merge(x, pattern, left, right)
    raise Unsupported(f"rearrange {pattern!r} of {describe(x)}: only splitting a Linear "
                      "output into attention heads, permuting heads and merging them back "
                      "are supported")


def _order(pattern: str, left: list, right: list) -> list[int]:
    if sorted(left) != sorted(right) or len(set(left)) != len(left):
        raise Unsupported(f"rearrange pattern {pattern!r}: the right side must be a "
                          "permutation of the left")
    return [left.index(name) for name in right]


def _split(x, pattern: str, left: list, right: list, lengths: dict):
    proj = x.proj if isinstance(x, Piece) else x
    axes = axes_of(proj.src.stream)
    if len(left) == len(axes) + 1 and not proj.src.stream.tokens:
        raise Unsupported(f"rearrange {pattern!r} of a Linear output without a token axis "
                          "(for a model whose input is the token sequence, pass "
                          "example_input)")
    if len(left) != len(axes) or not isinstance(left[-1], tuple) or not 2 <= len(left[-1]) <= 3:
        raise Unsupported(f"rearrange {pattern!r} of a Linear output with axes {axes}: the "
                          "left side must name each axis, the last as a group (h d) or "
                          "(three h d)")
    if not all(isinstance(e, str) for e in left[:-1] + right):
        raise Unsupported(f"rearrange {pattern!r}: only the feature axis may be grouped, on "
                          "the left side")
    group = left[-1]
    sizes = [lengths.get(name, -1) for name in group]
    shape = (*(Dim(label) for label in axes[:-1]), *sizes)
    heads = attention.split_heads(x, shape)
    return attention.permute(heads, _order(pattern, [*left[:-1], *group], right))


def _merge(c: Core, pattern: str, left: list, right: list) -> object:
    if not all(isinstance(e, str) for e in left) or len(left) != len(c.axes):
        raise Unsupported(f"rearrange {pattern!r} of attention heads with axes {c.axes}: name "
                          "each axis on the left")
    label = dict(zip(left, c.axes, strict=True))
    ok = (len(right) == 3 and isinstance(right[2], tuple) and len(right[2]) == 2
          and all(isinstance(e, str) for e in right[:2]))
    if not ok or [label.get(n) for n in (*right[:2], *right[2])] != ["B", "T", "A", "I"]:
        raise Unsupported(f"rearrange {pattern!r} of attention heads with axes {c.axes}: "
                          "only merging into (batch, tokens, (heads head_dim)) is supported")
    order = [c.axes.index(a) for a in ("B", "T", "A", "I")]
    return attention.merge(attention.permute(c, order), None)
