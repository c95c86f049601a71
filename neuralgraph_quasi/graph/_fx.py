"""Any ``nn.Module`` to a graph: trace its forward with :mod:`torch.fx`, then convert the
traced operations one by one with the same builders as ``nn.Sequential``.

Modules of a known type (``_converters.SUPPORTED``) stay leaves of the trace and go
through their converter; everything else is traced through. Each fx node evaluates to
an abstract value: a :class:`~._builder.Stream` of graph nodes (a materialised tensor),
a *pending* ``Linear`` (emitted as a plain layer, or as the Q/K/V projection of an
attention pattern), the stages of a hand-written attention (heads, scores, softmax,
attention output, merged heads), symbolic sizes, or a parameter read with ``get_attr``.

The graph holds one value per unit, so in-place meanings matter: an activation or an
addition ``x + f(x)`` *changes* the value its units hold. Every value remembers the
version of its units; using a stale value, or changing units that another operation
already read, raises instead of producing a silently wrong graph. Anything not
recognised exactly raises :class:`ConversionError` naming the fx node, its op and
target, and the module path.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp

from .. import models
from .._errors import ConversionError
from ._builder import FIXED, MIXED, Builder, Stream
from ._converters import (
    _ACTIVATIONS,
    _CONVERTERS,
    _NO_OPS,
    SUPPORTED,
    _attention,
    _grid,
    _inputs,
    _linear,
    _mha_on,
    _Proj,
    _residual,
    convert,
)
from ._schema import Act, EdgeType, NodeOp, NodeType

__all__ = ["is_direct", "trace_convert"]


def is_direct(model: nn.Module) -> bool:
    """Whether ``model`` converts without tracing: a known module, an ``nn.Sequential`` of
    such modules, or a torch built-in (which then raises its usual "unsupported" error)."""
    t = type(model)
    if t is nn.Sequential:
        return all(is_direct(c) for c in model._modules.values() if c is not None)
    return t in _CONVERTERS or t.__module__.startswith(("torch.nn", "torch.ao.nn"))


class _Tracer(fx.Tracer):
    """Known module types stay leaves (their converters know them); so do torch built-ins
    (fx's default), which then raise as unsupported. ``nn.Sequential`` is traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) is nn.Sequential:
            return False
        return type(m) in _CONVERTERS or super().is_leaf_module(m, qualname)


class _Unsupported(Exception):
    """Raised while evaluating an fx node; turned into a ConversionError naming the node."""


# -- abstract values ---------------------------------------------------------------------
@dataclass(frozen=True)
class _S:
    """A materialised tensor: its units are ``stream.nodes``; ``t[i]`` is the clock at
    which unit i's current value was written (see ``_FxConverter._read``)."""

    stream: Stream
    t: Tensor
    origin: str


@dataclass
class _Input:
    """The model's input; its nodes are made by the first layer that reads it."""

    rank: int | None
    s: _S | None = None
    taken: str | None = None  # path of a converter that made its own input nodes
    flat: bool = False


@dataclass
class _Pending:
    """``Linear(src)`` not yet emitted: a plain layer, or an attention projection."""

    module: nn.Linear
    path: str
    src: _S
    out: _S | None = None
    claimed: bool = False


@dataclass(frozen=True)
class _Dim:
    """A size not known while tracing (batch, tokens, spatial), by axis label."""

    label: str


@dataclass(frozen=True)
class _Heads:
    """A projection ``[..., D]`` split into ``[..., outer, inner]``; ``axes`` labels the
    dimensions (``"A"``: the outer split axis, ``"I"``: the inner one, ``"T"``: tokens)."""

    proj: _Pending
    outer: int
    inner: int
    axes: tuple[str, ...]


@dataclass(frozen=True)
class _Scores:
    q: _Heads
    k: _Heads
    axes: tuple[str, ...]


@dataclass(frozen=True)
class _Probs:
    q: _Heads
    k: _Heads
    axes: tuple[str, ...]


@dataclass(frozen=True)
class _Core:
    """Attention output per head, ``softmax(q kᵀ) v`` (or SDPA)."""

    q: _Heads
    k: _Heads
    v: _Heads
    axes: tuple[str, ...]


@dataclass(frozen=True)
class _Merged:
    """Heads merged back into ``[..., T, D]``: must feed the output projection."""

    core: _Core


@dataclass(frozen=True)
class _Scaled:
    """``c * value`` for a Python number ``c``: only ``sin`` may consume it (SIREN)."""

    value: object
    factor: float


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer read in the forward (``get_attr``), possibly sliced."""

    name: str
    tensor: Tensor
    kind: str


@dataclass(frozen=True)
class _Tuple:
    items: tuple


@dataclass(frozen=True)
class _Opaque:
    what: str


@dataclass
class _InShape:
    """``x.shape`` of the model input: symbolic sizes (concrete ones from example_input)."""

    items: tuple | None = None

    def __getitem__(self, i):
        if self.items is not None:
            return self.items[i]
        return _Dim("B") if i == 0 else _Dim(f"input axis {i}")


_ACT_FUNCTIONS = {
    F.relu: Act.RELU, torch.relu: Act.RELU, torch.relu_: Act.RELU, F.relu_: Act.RELU,
    torch.tanh: Act.TANH, F.tanh: Act.TANH, torch.sigmoid: Act.SIGMOID, F.sigmoid: Act.SIGMOID,
    F.gelu: Act.GELU, F.silu: Act.SILU, F.leaky_relu: Act.LEAKY_RELU, torch.sin: Act.SINE,
}
_ACT_METHODS = {"relu": Act.RELU, "relu_": Act.RELU, "tanh": Act.TANH, "tanh_": Act.TANH,
                "sigmoid": Act.SIGMOID, "sigmoid_": Act.SIGMOID, "sin": Act.SINE}
_ARITH = {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
          operator.floordiv: operator.floordiv, operator.truediv: operator.truediv,
          operator.pow: operator.pow}
_NUMERIC = {math.sqrt, math.log, math.exp, float, int, abs, round}  # on Python numbers only
_ALIASES = {F.dropout, F.dropout1d, F.dropout2d, F.avg_pool1d, F.avg_pool2d}
_ALIAS_METHODS = {"contiguous"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SUM_OPS = (NodeOp.LINEAR, NodeOp.CONV, NodeOp.EMBEDDING, NodeOp.ATTENTION_OUT,
            NodeOp.LAYER_NORM, NodeOp.BATCH_NORM)


def _axes(s: Stream) -> tuple[str, ...]:
    if s.kind == "conv1d":
        return ("B", "F", "S0")
    if s.kind == "conv2d":
        return ("B", "F", "S0", "S1")
    return ("B", "T", "F") if s.tokens else ("B", "F")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _describe(v) -> str:
    names = {_Input: "the model input", _Pending: "a Linear output", _Heads: "attention heads",
             _Scores: "attention scores", _Probs: "attention probabilities",
             _Core: "an attention output per head", _Merged: "merged attention heads",
             _Scaled: "a value times a constant", _Param: "a parameter", _S: "a tensor"}
    return names.get(type(v), type(v).__name__)


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    try:
        return _get_qualified_name(t)
    except Exception:  # noqa: BLE001 - fall back to the plain name
        return getattr(t, "__name__", repr(t))


# -- the converter -------------------------------------------------------------------------
@dataclass
class _FxConverter:
    model: nn.Module
    b: Builder
    example_input: object = None
    clock: int = 0
    node: fx.Node | None = None
    called: dict[str, str] = field(default_factory=dict)
    _mut: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _read_at: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        try:
            graph = _Tracer().trace(self.model)
        except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
            raise ConversionError(
                f"torch.fx cannot trace {type(self.model).__qualname__} (no fx node to name): "
                f"{type(e).__name__}: {e}") from None
        self.gm = fx.GraphModule(self.model, graph)
        self.args = self.example_input if isinstance(self.example_input, tuple) else (
            () if self.example_input is None else (self.example_input,))
        if self.args:
            self._propagate_shapes()

    def _propagate_shapes(self) -> None:
        modes = {m: m.training for m in self.model.modules()}
        self.gm.eval()  # BatchNorm in training mode would update its running statistics
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*self.args)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"example_input does not run through "
                                  f"{type(self.model).__qualname__}: {type(e).__name__}: {e}"
                                  ) from None
        finally:
            for m, mode in modes.items():
                m.training = mode

    # -- bookkeeping -----------------------------------------------------------------------
    def where(self, node: fx.Node) -> str:
        path, mtype = self._module_of(node)
        return (f"fx node {node.name!r} (op {node.op}, target {_target_name(node)}) in module "
                f"{path} ({mtype})")

    def _module_of(self, node: fx.Node) -> tuple[str, str]:
        if node.op == "call_module":
            return repr(node.target), type(self.gm.get_submodule(node.target)).__qualname__
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, mtype = list(stack.values())[-1]
            name = mtype if isinstance(mtype, str) else mtype.__qualname__
            return repr(path), name.rsplit(".", 1)[-1]
        return "<root>", type(self.model).__qualname__

    @property
    def path(self) -> str:
        return self._module_of(self.node)[0].strip("'")

    def _grow(self) -> None:
        n = self.b.num_nodes
        if self._mut.numel() < n:
            pad = torch.zeros(n - self._mut.numel(), dtype=torch.long)
            self._mut = torch.cat([self._mut, pad])
            self._read_at = torch.cat([self._read_at, pad.clone()])

    def _new(self, stream: Stream) -> _S:
        self._grow()
        return _S(stream, torch.full((stream.width,), self.clock, dtype=torch.long),
                  self.node.name)

    def _check_current(self, v: _S) -> None:
        self._grow()
        if bool((self._mut[v.stream.nodes] > v.t).any()):
            raise _Unsupported(
                f"uses the value of fx node {v.origin!r} after an activation or addition "
                "changed it in place (the graph holds one value per unit)")

    def _read(self, v: _S) -> None:
        self._check_current(v)
        self._read_at[v.stream.nodes] = self.clock

    def _mutate(self, v: _S, what: str) -> None:
        self._check_current(v)
        if bool((self._read_at[v.stream.nodes] > v.t).any()):
            raise _Unsupported(
                f"the value of fx node {v.origin!r} is read by another operation before {what} "
                "changes it (the graph holds one value per unit)")
        self._mut[v.stream.nodes] = self.clock

    def _own(self, module: nn.Module, path: str) -> None:
        """A module with parameters runs once, and its parameters belong to one path."""
        if next(module.parameters(), None) is None:
            return
        if path in self.called:
            raise _Unsupported(f"module {path!r} is called a second time (first by fx node "
                               f"{self.called[path]!r}): shared weights are not supported")
        self.called[path] = self.node.name
        if next(module.parameters(recurse=False), None) is not None:
            first = self.b.owners.setdefault(id(module), path)
            if first != path:
                raise _Unsupported(f"module {path!r} is the same object as {first!r}: shared "
                                   "(tied) weights are not supported")

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> Stream:
        env: dict[fx.Node, object] = {}
        result = None
        first_input = True
        for node in self.gm.graph.nodes:
            self.clock += 1
            self.node = node
            try:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "placeholder":
                    env[node] = _Input(self._rank()) if first_input else _Opaque("extra input")
                    first_input = False
                elif node.op == "get_attr":
                    env[node] = self._get_attr(node.target)
                elif node.op == "call_module":
                    env[node] = self._call_module(node.target, args, kwargs)
                elif node.op == "call_method":
                    env[node] = self._call_method(node.target, args, kwargs)
                elif node.op == "call_function":
                    env[node] = self._call_function(node.target, args, kwargs)
                elif node.op == "output":
                    result = self._output(args[0])
            except (_Unsupported, ConversionError) as e:
                raise ConversionError(f"{self.where(node)}: {e}") from None
        return result

    def _rank(self) -> int | None:
        return self.args[0].dim() if self.args and isinstance(self.args[0], Tensor) else None

    def _meta_shape(self, i: int = 0) -> tuple[int, ...] | None:
        arg = self.node.args[i] if len(self.node.args) > i else None
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _output(self, value) -> Stream:
        if isinstance(value, (tuple, list)):
            if len(value) != 1:
                raise _Unsupported("a forward returning several tensors is not supported")
            value = value[0]
        s = self._tensor(value)
        if s.stream.nodes.numel() and bool(
                (self.b.node_values("node_type", s.stream.nodes) == NodeType.INPUT).all()):
            raise _Unsupported("the output is the model input")
        return s.stream

    # -- values --------------------------------------------------------------------------
    def _tensor(self, v) -> _S:
        """The materialised tensor of ``v`` (emits a pending Linear)."""
        if isinstance(v, _S):
            self._check_current(v)
            return v
        if isinstance(v, _Pending):
            return self._materialize(v)
        if isinstance(v, _Input):
            if v.s is None or v.flat:
                raise _Unsupported("uses the model input directly; only layers with weights "
                                   "(or a residual addition after one) may read it")
            self._check_current(v.s)
            return v.s
        if isinstance(v, _Merged):
            raise _Unsupported("merged attention heads must feed a Linear output projection")
        raise _Unsupported(f"unsupported operand: {_describe(v)}")

    def _materialize(self, p: _Pending) -> _S:
        if p.claimed:
            raise _Unsupported(f"the output of Linear {p.path!r} is split into attention heads "
                               "and also used elsewhere")
        if p.out is None:
            out = self._new(_linear(self.b, p.module, p.path, p.src.stream))
            # written "just before" this node, so that this node's own reads count as reads
            p.out = _S(out.stream, out.t - 1, out.origin)
        self._check_current(p.out)
        return p.out

    def _input_spec(self, m: nn.Module, inp: _Input) -> tuple[str, int, bool] | None:
        tokens = inp.rank == 3 and not inp.flat
        t = type(m)
        if t is nn.Linear:
            return "vector", m.in_features, tokens
        if t in (nn.Conv1d, nn.Conv2d):
            return ("conv1d" if t is nn.Conv1d else "conv2d"), m.in_channels, False
        if t is nn.BatchNorm1d:
            return ("conv1d" if inp.rank == 3 else "vector"), m.num_features, False
        if t is nn.BatchNorm2d:
            return "conv2d", m.num_features, False
        if t is nn.LayerNorm and len(m.normalized_shape) == 1:
            return "vector", m.normalized_shape[0], tokens
        width = {models.SelfAttention: lambda: m.queries.in_features,
                 models.TransformerBlock: lambda: m.fc2.out_features,
                 nn.TransformerEncoderLayer: lambda: m.self_attn.embed_dim,
                 nn.TransformerEncoder: lambda: m.layers[0].self_attn.embed_dim,
                 nn.MultiheadAttention: lambda: m.embed_dim}.get(t)
        if t is models.TransformerClassifier and m.embedding is None:
            width = lambda: m.norm.normalized_shape[0]  # noqa: E731
        return None if width is None else ("vector", width(), True)

    def _value_in(self, x, m: nn.Module, path: str, mixed_ok: bool = False) -> _S | None:
        """The value module ``m`` reads (``None``: it makes its own input nodes)."""
        if isinstance(x, _Input) and x.s is None:
            spec = self._input_spec(m, x)
            if x.flat and (spec is None or type(m) is not nn.Linear):
                raise _Unsupported(f"the flattened model input feeds {type(m).__name__}; only a "
                                   "Linear may read it")
            if spec is None:
                if x.taken is not None:
                    raise _Unsupported(f"the model input feeds {path!r} and {x.taken!r}")
                x.taken = path
                return None
            if x.taken is not None:
                raise _Unsupported(f"the model input feeds {path!r} and {x.taken!r}")
            x.s = self._new(_inputs(self.b, spec[1], spec[0], spec[2]))
        if isinstance(x, _Input) and x.flat:
            if type(m) is not nn.Linear:
                raise _Unsupported(f"the flattened model input feeds {type(m).__name__}")
            val = x.s
        else:
            val = self._tensor(x)
        if val.stream.perm == MIXED and not mixed_ok:
            raise _Unsupported(f"a concatenation of branches feeds {type(m).__name__}: the "
                               "branches' units permute independently, which it does not allow")
        self._read(val)
        return val

    def _get_attr(self, target: str) -> _Param:
        owner, _, attr = target.rpartition(".")
        value = getattr(self.gm.get_submodule(owner), attr)
        if not isinstance(value, Tensor):
            raise _Unsupported(f"attribute {target!r} is not a tensor")
        return _Param(target, value, "parameter" if isinstance(value, nn.Parameter) else "buffer")

    # -- modules -------------------------------------------------------------------------
    def _call_module(self, target: str, args, kwargs):
        m = self.gm.get_submodule(target)
        t = type(m)
        self._own(m, target)
        if t is nn.Linear:
            if isinstance(args[0], _Merged):
                return self._emit_attention(args[0], m, target)
            return _Pending(m, target, self._value_in(args[0], m, target, mixed_ok=True))
        if t in _ACTIVATIONS:
            act = _ACTIVATIONS[t]
            return args[0] if act == Act.IDENTITY else self._activate(args[0], act)
        if t in _NO_OPS:
            return args[0]
        if t is nn.Flatten:
            return self._flatten(args[0], m.start_dim, m.end_dim)
        if t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
            return self._adaptive_pool(args[0], m.output_size)
        if t in (nn.AvgPool1d, nn.AvgPool2d):
            return self._alias(args[0], spatial=None)
        if t is models.MeanPool:
            return self._mean(args[0], m.dim, False)
        if t is nn.MultiheadAttention:
            return self._mha(m, target, args, kwargs)
        if t in _CONVERTERS and t is not nn.Sequential:
            if len(args) != 1 or kwargs:
                raise _Unsupported(f"{t.__name__} called with extra arguments "
                                   f"{list(kwargs) or len(args) - 1}; only the input is supported")
            mixed_ok = t in (nn.Conv1d, nn.Conv2d, models.SelfAttention)
            v = self._value_in(args[0], m, target, mixed_ok)
            return self._new(convert(self.b, m, target, None if v is None else v.stream))
        raise _Unsupported(f"unsupported module {target!r} of type {t.__qualname__}; supported: "
                           f"{', '.join(SUPPORTED)}")

    def _mha(self, m: nn.MultiheadAttention, target: str, args, kwargs):
        names = ("query", "key", "value")
        values = list(args[:3]) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        if len(values) != 3 or len(args) > 3:
            raise _Unsupported("MultiheadAttention must be called as (query, key, value, ...) "
                               "with keyword options")
        for key, val in kwargs.items():
            if key in names or key in ("need_weights", "average_attn_weights"):
                continue
            if val is not None and val is not False:
                raise _Unsupported(f"MultiheadAttention option {key}={val!r} is not supported")
        streams = []
        for x in values:
            streams.append(self._value_in(x, m, target, mixed_ok=True).stream)
        out = self._new(_mha_on(self.b, m, target, tuple(streams)))
        return _Tuple((out, _Opaque("attention weights")))

    # -- elementwise ---------------------------------------------------------------------
    def _activate(self, x, act: Act):
        if isinstance(x, _Scaled):
            if act != Act.SINE:
                raise _Unsupported(f"a constant factor before {act.name.lower()} cannot be held "
                                   "by the graph (only sin(w0 * x), SIREN's sine, can)")
            x = x.value
        if isinstance(x, _Input):
            raise _Unsupported("an activation on the model input, before any layer with "
                               "weights, is not supported")
        s = self._tensor(x)
        self._mutate(s, f"the {act.name.lower()} activation")
        return self._new(self.b.activate(s.stream, act, self.path))

    def _scale(self, value, factor):
        if isinstance(value, _Scores):
            return value  # a constant temperature keeps every attention symmetry
        if isinstance(value, _Scaled):
            return _Scaled(value.value, value.factor * factor)
        if isinstance(value, (_S, _Pending)):
            return _Scaled(value, factor)
        raise _Unsupported(f"multiplying {_describe(value)} by a constant is not supported")

    def _arith(self, fn, a, b):
        if _is_num(a) and _is_num(b):
            return fn(a, b)
        if isinstance(a, (_Dim, int)) and isinstance(b, (_Dim, int, float)) or \
                isinstance(b, _Dim) and _is_num(a):
            return _Dim("?")
        if fn is operator.add:
            return self._add(a, b)
        if fn is operator.mul and _is_num(a):
            return self._scale(b, a)
        if fn is operator.mul and _is_num(b):
            return self._scale(a, b)
        if fn is operator.truediv and _is_num(b) and b != 0:
            return self._scale(a, 1.0 / b)
        raise _Unsupported(f"{fn.__name__} of {_describe(a)} and {_describe(b)} is not supported")

    def _add(self, a, b):
        if isinstance(a, tuple) and isinstance(b, tuple):
            return a + b
        if isinstance(b, _Param):
            return self._add_positions(a, b)
        if isinstance(a, _Param):
            return self._add_positions(b, a)
        sa, sb = self._tensor(a), self._tensor(b)
        for attr in ("kind", "tokens", "width"):
            if getattr(sa.stream, attr) != getattr(sb.stream, attr):
                raise _Unsupported(f"addition of tensors with different {attr}: "
                                   f"{getattr(sa.stream, attr)} and {getattr(sb.stream, attr)}")
        holders = [v for v in (sa, sb) if self._can_hold_sum(v)]
        if not holders:
            raise _Unsupported("neither operand of the addition can hold the sum (each is a "
                               "model input, already has an activation, or is read elsewhere)")
        out = max(holders, key=lambda v: int(v.stream.nodes.max()))
        skip = sb if out is sa else sa
        if skip.stream.perm == MIXED:
            raise _Unsupported("a concatenation of branches as a residual skip is not supported")
        self._read(skip)
        self._mutate(out, "the addition")
        with self._at_layer(out.stream.nodes):
            s = _residual(self.b, skip.stream, out.stream, self.path)
        return self._new(s)

    def _can_hold_sum(self, v: _S) -> bool:
        s = v.stream
        if s.perm == MIXED or s.has_act or not s.nodes.numel():
            return False
        if bool((self._read_at[s.nodes] > v.t).any()):
            return False
        types = self.b.node_values("node_type", s.nodes)
        ops = self.b.node_values("node_op", s.nodes)
        return bool((types == NodeType.HIDDEN).all()) and bool(
            torch.isin(ops, torch.tensor([int(o) for o in _SUM_OPS])).all())

    def _at_layer(self, nodes: Tensor):
        b = self.b
        layer = int(b.node_values("node_layer", nodes[:1]))

        class _Ctx:
            def __enter__(self):
                self.old, b.layer = b.layer, layer

            def __exit__(self, *exc):
                b.layer = self.old

        return _Ctx()

    def _add_positions(self, x, p: _Param):
        s = self._tensor(x)
        shape = tuple(p.tensor.shape)
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if not (s.stream.kind == "vector" and s.stream.tokens and len(shape) == 2):
            raise _Unsupported(f"parameter {p.name!r} of shape {tuple(p.tensor.shape)} added to "
                               "a tensor: only a positional table [T, d] (or [1, T, d]) added "
                               "to a token sequence is supported")
        num, dim = shape
        if dim != s.stream.width:
            raise _Unsupported(f"positional table {p.name!r} has width {dim}, the tokens "
                               f"{s.stream.width}")
        if not self._can_hold_sum(s):
            raise _Unsupported(f"positional table {p.name!r} must be added to the fresh output "
                               "of a layer with weights (no activation, not read elsewhere)")
        self._mutate(s, "adding the positional table")
        b = self.b
        old, b.layer = b.layer, 0
        positions = b.nodes(num, NodeType.INPUT, NodeOp.INPUT, FIXED)
        b.layer = old
        pid = b.param(p.name, p.tensor, p.kind)
        t, f = _grid(num, dim)
        with self._at_layer(s.stream.nodes):
            b.edges(positions[t], s.stream.nodes[f], EdgeType.EMBEDDING, pid=pid,
                    offset=t * dim + f)
        return self._new(s.stream)

    def _param_slice(self, p: _Param, index) -> _Param:
        index = index if isinstance(index, tuple) else (index,)
        token_axis = 1 if p.tensor.dim() == 3 and p.tensor.size(0) == 1 else 0
        for axis, item in enumerate(index):
            full = isinstance(item, slice) and item.start in (None, 0) and item.step in (None, 1)
            if not full or (axis != token_axis and item.stop is not None):
                raise _Unsupported(f"indexing parameter {p.name!r} with {index!r}: only a prefix "
                                   "of its token axis (e.g. pos[:T]) is supported")
        return p

    # -- reshapes and pools ----------------------------------------------------------------
    def _alias(self, x, **changes):
        if isinstance(x, _Input):
            raise _Unsupported("pooling the model input is not supported")
        s = self._tensor(x)
        return _S(s.stream.evolve(**changes), s.t, s.origin)

    def _adaptive_pool(self, x, size):
        s = self._tensor(x)
        n = {"conv1d": 1, "conv2d": 2}.get(s.stream.kind)
        if n is None:
            raise _Unsupported(f"adaptive average pooling of a {s.stream.kind} tensor")
        size = (size,) * n if isinstance(size, int) else tuple(size)
        if len(size) != n or not all(isinstance(v, int) for v in size):
            raise _Unsupported(f"adaptive pooling to output size {size} is not supported")
        return self._alias(s, spatial=size)

    def _mean(self, x, dims, keepdim):
        s = self._tensor(x)
        axes = _axes(s.stream)
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not all(isinstance(d, int) for d in dims):
            raise _Unsupported(f"mean over dims {dims}")
        dims = sorted(d % len(axes) for d in dims)
        spatial = [i for i, a in enumerate(axes) if a.startswith("S")]
        if spatial and dims == spatial:
            if keepdim:
                return self._alias(s, spatial=(1,) * len(spatial))
            return self._alias(s, kind="vector", spatial=None)
        if s.stream.tokens and dims == [axes.index("T")] and not keepdim:
            return self._alias(s, tokens=False)
        raise _Unsupported(f"mean over dims {dims} of a tensor with axes {axes}: only global "
                           "average pooling (all spatial axes, or the token axis) is supported")

    def _flatten(self, x, start: int = 0, end: int = -1):
        if isinstance(x, _Core):
            n = len(x.axes)
            if start % n == n - 2 and end % n == n - 1:
                return self._merge(x, None)
            raise _Unsupported(f"flatten({start}, {end}) of attention heads {x.axes}")
        if isinstance(x, _Input):
            if start == 1 and end == -1 and x.s is None:
                x.flat = True
                return x
            raise _Unsupported(f"flatten({start}, {end}) of the model input")
        s = self._tensor(x)
        n = len(_axes(s.stream))
        if start % n != 1 or end % n != n - 1:
            raise _Unsupported(f"flatten({start}, {end}) of a {s.stream.kind} tensor: only "
                               "flatten(1) (keep the batch axis) is supported")
        if s.stream.kind == "vector" and not s.stream.tokens:
            return s
        if s.stream.kind == "vector":
            raise _Unsupported("flatten of a token sequence is not supported (pool over tokens "
                               "first)")
        spatial = s.stream.spatial
        meta = self._meta_shape()
        if spatial is None and meta is not None:
            spatial = tuple(meta[2:])
        return self._alias(s, kind="flat", spatial=spatial)

    def _shape(self, v):
        if isinstance(v, _Input):
            meta = self._meta_shape()
            if meta is None:
                return _InShape()
            labels = {3: ("B", "T", None), 4: ("B", None, "S0", "S1")}.get(len(meta), ())
            return _InShape(tuple(_Dim(lab) if lab else size for lab, size in
                                  zip(labels, meta, strict=True)) if labels else
                            (_Dim("B"), *meta[1:]))
        if isinstance(v, (_Heads, _Core)):
            sizes = {"A": v.outer if isinstance(v, _Heads) else v.q.outer,
                     "I": v.inner if isinstance(v, _Heads) else v.q.inner}
            return tuple(sizes.get(a, _Dim(a)) for a in v.axes)
        if isinstance(v, _Pending):
            return tuple(_Dim(a) if a != "F" else v.module.out_features
                         for a in _axes(v.src.stream))
        s = self._tensor(v)
        width = s.stream.width
        if s.stream.kind == "flat":
            width = width * prod(s.stream.spatial) if s.stream.spatial else _Dim("F")
        return tuple(width if a == "F" else _Dim(a) for a in _axes(s.stream))

    def _reshape(self, x, shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if isinstance(x, _Pending):
            return self._split_heads(x, shape)
        if isinstance(x, _Core):
            return self._merge(x, shape)
        flat_args = len(shape) == 2 and (shape[0] == _Dim("B") or shape[0] == -1)
        if isinstance(x, _Input):
            if flat_args and x.s is None:
                x.flat = True
                return x
            raise _Unsupported(f"reshape of the model input to {shape}")
        s = self._tensor(x)
        if flat_args and not s.stream.tokens:
            return self._flatten(s, 1, -1)
        raise _Unsupported(f"reshape of a {s.stream.kind} tensor{' of tokens' * s.stream.tokens} "
                           f"to {shape}: only flattening to (batch, -1) or splitting a Linear "
                           "output into attention heads is supported")

    # -- attention ---------------------------------------------------------------------------
    def _split_heads(self, p: _Pending, shape):
        axes = _axes(p.src.stream)
        width = p.module.out_features
        if axes[-1] != "F" or len(shape) != len(axes) + 1:
            raise _Unsupported(f"view of a Linear output {axes} as {shape}: only splitting the "
                               "feature axis into (heads, head_dim) is supported")
        lead, (outer, inner) = shape[:-2], shape[-2:]
        if sum(1 for v in shape if v == -1) > 1:
            raise _Unsupported(f"view as {shape}: several -1")
        for label, arg in zip(axes[:-1], lead, strict=True):
            if arg != -1 and arg != _Dim(label):
                raise _Unsupported(f"view of a Linear output {axes} as {shape}: the leading "
                                   "sizes must be the tensor's own")
        if outer == -1 and isinstance(inner, int) and inner > 0 and width % inner == 0:
            outer = width // inner
        if inner == -1 and isinstance(outer, int) and outer > 0 and width % outer == 0:
            inner = width // outer
        if not (isinstance(outer, int) and isinstance(inner, int) and outer * inner == width):
            raise _Unsupported(f"view of a Linear output of width {width} as {shape}")
        if p.claimed or p.out is not None:
            raise _Unsupported(f"the output of Linear {p.path!r} is split into heads twice, or "
                               "also used elsewhere")
        if not p.src.stream.tokens:
            raise _Unsupported("attention heads over a tensor without a token axis")
        p.claimed = True
        return _Heads(p, outer, inner, (*axes[:-1], "A", "I"))

    def _permute(self, x, order):
        if not isinstance(x, (_Heads, _Core)):
            if isinstance(x, (_S, _Pending, _Input)):
                raise _Unsupported(f"transposing {_describe(x)} is not supported (only attention "
                                   "heads may be transposed)")
            raise _Unsupported(f"transposing {_describe(x)}")
        axes = x.axes
        new = tuple(axes[i % len(axes)] for i in order)
        if sorted(new) != sorted(axes):
            raise _Unsupported(f"permutation {order} of axes {axes}")
        if isinstance(x, _Heads):
            return _Heads(x.proj, x.outer, x.inner, new)
        return _Core(x.q, x.k, x.v, new)

    def _transpose(self, x, a: int, b: int):
        n = len(getattr(x, "axes", ())) or 1
        order = list(range(n))
        order[a % n], order[b % n] = order[b % n], order[a % n]
        return self._permute(x, order)

    @staticmethod
    def _head_layout(h: _Heads, last: tuple[str, str]) -> bool:
        return h.axes[-2:] == last and sorted(h.axes[:-2]) == ["A", "B"]

    def _matmul(self, a, b):
        if isinstance(a, _Heads) and isinstance(b, _Heads):
            if not (self._head_layout(a, ("T", "I")) and self._head_layout(b, ("I", "T"))
                    and a.axes[:-2] == b.axes[:-2]):
                raise _Unsupported(f"matmul of attention heads with axes {a.axes} and {b.axes}: "
                                   "expected q [.., T, head_dim] @ kᵀ [.., head_dim, T] per head")
            return _Scores(a, b, (*a.axes[:-2], "T", "T"))
        if isinstance(a, _Probs) and isinstance(b, _Heads):
            if not (self._head_layout(b, ("T", "I")) and b.axes[:-2] == a.axes[:-2]):
                raise _Unsupported(f"matmul of attention probabilities with values of axes "
                                   f"{b.axes}")
            return self._core(a.q, a.k, b)
        raise _Unsupported(f"matmul of {_describe(a)} and {_describe(b)}: only the attention "
                           "pattern softmax(q kᵀ) v is supported")

    def _core(self, q: _Heads, k: _Heads, v: _Heads) -> _Core:
        projs = {id(q.proj), id(k.proj), id(v.proj)}
        if len(projs) != 3:
            raise _Unsupported("query, key and value must come from three different Linear "
                               "projections")
        if len({(h.outer, h.inner) for h in (q, k, v)}) != 1:
            raise _Unsupported("query, key and value are split into different head shapes")
        return _Core(q, k, v, v.axes)

    def _softmax(self, x, dim):
        if not isinstance(x, _Scores):
            raise _Unsupported(f"softmax of {_describe(x)}: only attention scores are supported")
        if dim is None or dim % len(x.axes) != len(x.axes) - 1:
            raise _Unsupported(f"softmax over dim {dim} of attention scores: only over keys "
                               "(the last axis)")
        return _Probs(x.q, x.k, x.axes)

    def _sdpa(self, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args, strict=False)) | dict(kwargs)
        if bound.get("attn_mask") is not None:
            raise _Unsupported("scaled_dot_product_attention with an attn_mask is not supported")
        if bound.get("enable_gqa"):
            raise _Unsupported("grouped-query attention is not supported")
        q, k, v = (bound.get(n) for n in names[:3])
        if not all(isinstance(h, _Heads) for h in (q, k, v)):
            raise _Unsupported("scaled_dot_product_attention needs q, k and v split into heads "
                               "from Linear projections")
        if not all(self._head_layout(h, ("T", "I")) and h.axes == q.axes for h in (q, k, v)):
            raise _Unsupported(f"scaled_dot_product_attention on heads with axes {q.axes}, "
                               f"{k.axes}, {v.axes}")
        return self._core(q, k, v)

    def _merge(self, c: _Core, shape) -> _Merged:
        axes = c.axes
        if axes[-2:] != ("A", "I") or axes[:-2] != ("B", "T"):
            raise _Unsupported(f"merging attention heads with axes {axes}: transpose back to "
                               "(batch, tokens, heads, head_dim) first")
        if shape is not None:
            width = c.q.outer * c.q.inner
            ok = len(shape) == 3 and shape[-1] in (width, -1) and all(
                arg in (-1, _Dim(label)) for arg, label in zip(shape[:2], axes[:2], strict=True))
            if not ok or sum(1 for v in shape if v == -1) > 1:
                raise _Unsupported(f"merging attention heads {axes} with view/reshape {shape}")
        return _Merged(c)

    def _emit_attention(self, merged: _Merged, out: nn.Linear, path: str) -> _S:
        c = merged.core
        heads, d_head = c.q.outer, c.q.inner
        inner = heads * d_head
        if out.in_features != inner:
            raise _Unsupported(f"output projection {path!r} reads {out.in_features} features, "
                               f"the heads give {inner}")
        b = self.b
        projs = []
        for h in (c.q, c.k, c.v):
            lin = h.proj.module
            pid = b.param(f"{h.proj.path}.weight", lin.weight)
            bias = None if lin.bias is None else b.param(f"{h.proj.path}.bias", lin.bias)
            projs.append(_Proj(pid, 0, lin.in_features, bias))
            self._check_current(h.proj.src)
        o = _Proj(b.param(f"{path}.weight", out.weight), 0, inner,
                  None if out.bias is None else b.param(f"{path}.bias", out.bias))
        sources = tuple(h.proj.src.stream for h in (c.q, c.k, c.v))
        parent = path.rpartition(".")[0]
        return self._new(_attention(b, parent, sources, heads, tuple(projs), o,
                                    out.out_features, inner))

    # -- dispatch ----------------------------------------------------------------------------
    def _call_method(self, name: str, args, kwargs):
        x, rest = args[0], args[1:]
        if name in _ACT_METHODS and not rest:
            return self._activate(x, _ACT_METHODS[name])
        if name in _ALIAS_METHODS:
            return x
        if name == "size":
            shape = self._shape(x)
            dim = rest[0] if rest else kwargs.get("dim")
            return shape if dim is None else shape[dim]
        if name in ("view", "reshape"):
            return self._reshape(x, rest)
        if name == "flatten":
            return self._flatten(x, *rest, **kwargs)
        if name == "transpose":
            return self._transpose(x, *rest)
        if name == "permute":
            return self._permute(x, rest[0] if len(rest) == 1 else rest)
        if name == "mean":
            return self._mean(x, kwargs.get("dim", rest[0] if rest else None),
                              kwargs.get("keepdim", rest[1] if len(rest) > 1 else False))
        if name == "softmax":
            return self._softmax(x, kwargs.get("dim", rest[0] if rest else None))
        if name in ("add", "add_") and len(rest) == 1 and not kwargs:
            return self._arith(operator.add, x, rest[0])
        if name in ("mul", "mul_") and len(rest) == 1:
            return self._arith(operator.mul, x, rest[0])
        if name in ("div", "div_") and len(rest) == 1:
            return self._arith(operator.truediv, x, rest[0])
        if name == "matmul":
            return self._matmul(x, rest[0])
        raise _Unsupported(f"method {name!r} on {_describe(x)} is not supported")

    def _call_function(self, fn, args, kwargs):
        if fn in _ACT_FUNCTIONS:
            if fn is F.leaky_relu or fn is F.gelu:
                pass  # slope / approximation are hyperparameters kept by the module's code
            elif len(args) > 1 or set(kwargs) - {"inplace"}:
                raise _Unsupported(f"extra arguments {args[1:]} {kwargs}")
            return self._activate(args[0], _ACT_FUNCTIONS[fn])
        if fn in _ARITH:
            return self._arith(_ARITH[fn], *args)
        if fn in _NUMERIC and all(_is_num(a) for a in args) and not kwargs:
            return fn(*args)
        if fn is torch.add or fn is torch.mul or fn is torch.div:
            if kwargs or len(args) != 2:
                raise _Unsupported(f"{fn.__name__} with options {kwargs}")
            op = {torch.add: operator.add, torch.mul: operator.mul, torch.div: operator.truediv}
            return self._arith(op[fn], *args)
        if fn is operator.getitem:
            return self._getitem(*args)
        if fn is getattr:
            return self._getattr(*args)
        if fn in _ALIASES:
            return args[0] if fn in (F.dropout, F.dropout1d, F.dropout2d) or isinstance(
                args[0], (_Probs,)) else self._alias(args[0], spatial=None)
        if fn in _CAT:
            return self._cat(*args, **kwargs)
        if fn is torch.flatten:
            return self._flatten(*args, **kwargs)
        if fn is torch.mean:
            dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
            return self._mean(args[0], dims, kwargs.get("keepdim", args[2] if len(args) > 2
                                                        else False))
        if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
            return self._adaptive_pool(args[0], kwargs.get("output_size", args[1:2] or [None])[0]
                                       if "output_size" not in kwargs else kwargs["output_size"])
        if fn in (torch.matmul, operator.matmul):
            return self._matmul(*args)
        if fn in (F.softmax, torch.softmax):
            return self._softmax(args[0], kwargs.get("dim", args[1] if len(args) > 1 else None))
        if fn is F.scaled_dot_product_attention:
            return self._sdpa(args, kwargs)
        if fn is torch.transpose:
            return self._transpose(*args)
        if fn is torch.permute:
            return self._permute(args[0], args[1])
        raise _Unsupported("unsupported function")

    def _getitem(self, x, index):
        if isinstance(x, (tuple, list, _InShape)):
            return x[index]
        if isinstance(x, _Tuple):
            item = x.items[index]
            if isinstance(item, _Opaque):
                raise _Unsupported(f"{item.what} are not supported")
            return item
        if isinstance(x, _Param):
            return self._param_slice(x, index)
        raise _Unsupported(f"indexing {_describe(x)} with {index!r} is not supported")

    def _getattr(self, x, name: str):
        if name == "shape":
            return self._shape(x)
        if name == "mT" and isinstance(x, _Heads):
            return self._transpose(x, -2, -1)
        raise _Unsupported(f"attribute {name!r} of {_describe(x)} is not supported")

    def _cat(self, tensors, dim=0):
        vals = [self._tensor(v) for v in tensors]
        streams = [v.stream for v in vals]
        first = streams[0]
        for s in streams[1:]:
            if (s.kind, s.tokens, s.spatial) != (first.kind, first.tokens, first.spatial):
                raise _Unsupported("concatenation of tensors of different kinds")
        axes = _axes(first)
        if dim % len(axes) != axes.index("F"):
            raise _Unsupported(f"concatenation along dim {dim} (axes {axes}): only along the "
                               "feature/channel axis")
        nodes = torch.cat([s.nodes for s in streams])
        if torch.unique(nodes).numel() != nodes.numel():
            raise _Unsupported("a unit appears twice in the concatenation")
        parts = tuple(c for s in streams for c in (s.parts or (s.perm,)))
        stream = Stream(nodes, first.kind, MIXED, first.spatial, first.tokens,
                        any(s.has_act for s in streams), parts)
        return _S(stream, torch.cat([v.t for v in vals]), self.node.name)


def trace_convert(b: Builder, model: nn.Module, example_input=None) -> Stream:
    """Trace ``model`` with torch.fx and add its layers to ``b``; returns the output stream.

    Args:
        b: the builder.
        model: any ``nn.Module`` whose forward fx can trace.
        example_input: a tensor or tuple of tensors the model accepts (optional): shapes
            from :class:`~torch.fx.passes.shape_prop.ShapeProp` give the input's rank
            (token axis or not) and the spatial shape of a flattened feature map.
    """
    return _FxConverter(model, b, example_input).run()
