"""What the fx converter tracks while it walks the traced graph: the fx node being converted,
and the version of every graph unit.

The graph holds one value per unit, so in-place meanings matter: an activation or an addition
``x + f(x)`` *changes* the value its units hold. Every :class:`~._fx_values.TensorValue`
remembers when its units were written; using a stale value, or changing units that another
operation already read, raises instead of producing a silently wrong graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, fx

from ._builder import MIXED, Builder, Stream
from ._converters import _linear
from ._fx_values import Input, Merged, Pending, Piece, TensorValue, Unsupported, describe
from ._schema import NodeOp, NodeType

# ops whose fresh output may hold a residual sum or a positional table
_SUM_OPS = torch.tensor([int(o) for o in (NodeOp.LINEAR, NodeOp.CONV, NodeOp.EMBEDDING,
                                          NodeOp.ATTENTION_OUT, NodeOp.LAYER_NORM,
                                          NodeOp.BATCH_NORM)])


class FxState:
    """The builder, the fx node being converted (``node``, its module ``path``, the ``clock``
    that counts nodes) and, per graph unit, the clock of its last change and last read."""

    def __init__(self, b: Builder) -> None:
        self.b = b
        self.clock = 0
        self.node: fx.Node | None = None
        self.path = ""
        self._changed_at = torch.zeros(0, dtype=torch.long)
        self._read_at = torch.zeros(0, dtype=torch.long)

    # -- versions --------------------------------------------------------------------------
    def _grow(self) -> None:
        missing = self.b.num_nodes - self._changed_at.numel()
        if missing > 0:
            pad = torch.zeros(missing, dtype=torch.long)
            self._changed_at = torch.cat([self._changed_at, pad])
            self._read_at = torch.cat([self._read_at, pad])

    def new(self, stream: Stream) -> TensorValue:
        """``stream``'s units, written now."""
        self._grow()
        return TensorValue(stream, torch.full((stream.width,), self.clock, dtype=torch.long),
                           self.node.name)

    def check_current(self, v: TensorValue) -> None:
        self._grow()
        if bool((self._changed_at[v.stream.nodes] > v.written).any()):
            raise Unsupported(
                f"uses the value of fx node {v.origin!r} after an activation or addition "
                "changed it in place (the graph holds one value per unit)")

    def read(self, v: TensorValue) -> None:
        self.check_current(v)
        self._read_at[v.stream.nodes] = self.clock

    def mutate(self, v: TensorValue, what: str) -> None:
        """``what`` changes the units of ``v`` in place."""
        self.check_current(v)
        if bool((self._read_at[v.stream.nodes] > v.written).any()):
            raise Unsupported(
                f"the value of fx node {v.origin!r} is read by another operation before {what} "
                "changes it (the graph holds one value per unit)")
        self._changed_at[v.stream.nodes] = self.clock

    def can_hold_sum(self, v: TensorValue) -> bool:
        """Whether ``v`` is the fresh, unread output of a layer with weights, so that an
        addition may change its units in place."""
        s = v.stream
        if s.perm == MIXED or s.has_act or not s.nodes.numel():
            return False
        if bool((self._read_at[s.nodes] > v.written).any()):
            return False
        types = self.b.node_values("node_type", s.nodes)
        ops = self.b.node_values("node_op", s.nodes)
        return bool((types == NodeType.HIDDEN).all()) and bool(torch.isin(ops, _SUM_OPS).all())

    # -- values ----------------------------------------------------------------------------
    def tensor(self, v) -> TensorValue:
        """The materialised tensor of ``v`` (emits a pending Linear)."""
        if isinstance(v, TensorValue):
            self.check_current(v)
            return v
        if isinstance(v, Pending):
            return self._materialize(v)
        if isinstance(v, Input):
            if v.value is None or v.flat:
                raise Unsupported("uses the model input directly; only layers with weights "
                                  "(or a residual addition after one) may read it")
            self.check_current(v.value)
            return v.value
        if isinstance(v, Merged):
            raise Unsupported("merged attention heads must feed a Linear output projection")
        if isinstance(v, Piece):
            raise Unsupported(f"a piece of the split output of Linear {v.proj.path!r} is used "
                              "as a tensor: the pieces of a split Linear output may only "
                              "become attention q, k and v (anything else would need one "
                              "graph stream per piece)")
        raise Unsupported(f"unsupported operand: {describe(v)}")

    def _materialize(self, p: Pending) -> TensorValue:
        if p.claimed:
            raise Unsupported(f"the output of Linear {p.path!r} is split into attention heads "
                              "and also used elsewhere")
        if p.out is None:
            out = self.new(_linear(self.b, p.module, p.path, p.src.stream))
            # written "just before" this node, so that this node's own reads count as reads
            p.out = TensorValue(out.stream, out.written - 1, out.origin)
        self.check_current(p.out)
        return p.out

    def meta_shape(self, i: int = 0) -> tuple[int, ...] | None:
        """The shape of the current node's ``i``-th argument, from ``ShapeProp`` (if run)."""
        arg = self.node.args[i] if len(self.node.args) > i else None
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@contextmanager
def at_layer(b: Builder, layer: int) -> Iterator[None]:
    """Add nodes and edges at ``layer`` of ``b``, then go back to the current layer."""
    old, b.layer = b.layer, layer
    try:
        yield
    finally:
        b.layer = old


def layer_of(b: Builder, nodes: Tensor) -> int:
    return int(b.node_values("node_layer", nodes[:1]))
