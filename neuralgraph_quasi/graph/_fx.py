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

import bisect
import dis
import inspect
import math
import operator
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp

from .. import models
from .._errors import ConversionError
from . import _fx_attention as attention
from . import _fx_einops as einops
from . import _fx_ops as ops
from . import _fx_shapes as shapes
from ._builder import MIXED, Builder, Stream
from ._converters import _ACTIVATIONS, _CONVERTERS, _NO_OPS, SUPPORTED, _inputs, _mha_on, convert
from ._fx_state import FxState
from ._fx_values import (
    Heads,
    Input,
    InShape,
    Items,
    Merged,
    Opaque,
    Param,
    Pending,
    TensorValue,
    Unsupported,
    describe,
    is_num,
    resolve,
)
from ._schema import Act, NodeType

__all__ = ["is_direct", "trace_convert"]


def is_direct(model: nn.Module) -> bool:
    """Whether ``model`` converts without tracing: a known module, an ``nn.Sequential`` of
    such modules, or a torch built-in (which then raises its usual "unsupported" error)."""
    t = type(model)
    if t is nn.Sequential:
        return all(is_direct(c) for c in model._modules.values() if c is not None)
    return t in _CONVERTERS or t.__module__.startswith(("torch.nn", "torch.ao.nn"))


def _rearrange():
    """``einops.rearrange`` if einops is installed (it is optional)."""
    try:
        from einops import rearrange
    except ImportError:
        return None
    return rearrange


class _Proxy(fx.Proxy):
    """A proxy that can also be iterated where fx cannot see the unpacking (``map(f,
    x.chunk(3, -1))``): the pieces of a ``chunk`` into a known number."""

    def __iter__(self):
        node = self.node
        count = None
        if node.op == "call_method" and node.target == "chunk" or node.target is torch.chunk:
            count = _arg(node.args[1:], node.kwargs, 0, "chunks")
        elif node.op == "call_method" and node.target == "split" or node.target is torch.split:
            sizes = _arg(node.args[1:], node.kwargs, 0, "split_size_or_sections" if
                         node.op == "call_function" else "split_size")
            count = len(sizes) if isinstance(sizes, (list, tuple)) else None
        if isinstance(count, int):
            return iter([self[i] for i in range(count)])
        # ``a, b, c = proxy``: fx reads the count from the caller's UNPACK_SEQUENCE, which
        # calling fx's own __iter__ from here would not see
        caller = inspect.currentframe().f_back
        code = list(dis.get_instructions(caller.f_code))
        at = bisect.bisect_left([i.offset for i in code], caller.f_lasti)
        if at < len(code) and code[at].opname == "UNPACK_SEQUENCE":
            return iter([self[i] for i in range(code[at].argval)])
        return self.tracer.iter(self)


class _Tracer(fx.Tracer):
    """Known module types stay leaves (their converters know them); so do torch built-ins
    (fx's default), which then raise as unsupported. ``nn.Sequential`` is traced through.
    Buffers are read as fx nodes (a causal mask sliced to the sequence length), and
    ``einops.rearrange`` is one fx node."""

    proxy_buffer_attributes = True

    def __init__(self) -> None:
        rearrange = _rearrange()
        super().__init__(autowrap_functions=(rearrange,) if rearrange is not None else ())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) is nn.Sequential:
            return False
        return type(m) in _CONVERTERS or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root, concrete_args=None):
        """fx wraps ``rearrange`` imported by name (``autowrap_functions``); a forward that
        calls ``einops.rearrange`` reads the module's attribute, patched here meanwhile."""
        einops_module = sys.modules.get("einops")
        original = getattr(einops_module, "rearrange", None)
        if original is None:
            return super().trace(root, concrete_args)

        def rearrange(tensor, *args, **kwargs):
            if isinstance(tensor, fx.Proxy):
                return tensor.tracer.create_proxy("call_function", original, (tensor, *args),
                                                  kwargs)
            return original(tensor, *args, **kwargs)

        einops_module.rearrange = rearrange
        try:
            return super().trace(root, concrete_args)
        finally:
            einops_module.rearrange = original


_ACT_FUNCTIONS = {
    F.relu: Act.RELU, torch.relu: Act.RELU, torch.relu_: Act.RELU, F.relu_: Act.RELU,
    torch.tanh: Act.TANH, F.tanh: Act.TANH, torch.sigmoid: Act.SIGMOID, F.sigmoid: Act.SIGMOID,
    F.gelu: Act.GELU, F.silu: Act.SILU, F.leaky_relu: Act.LEAKY_RELU, torch.sin: Act.SINE,
}
_ACT_METHODS = {"relu": Act.RELU, "relu_": Act.RELU, "tanh": Act.TANH, "tanh_": Act.TANH,
                "sigmoid": Act.SIGMOID, "sigmoid_": Act.SIGMOID, "sin": Act.SINE}
_ARITH = {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
          operator.floordiv: operator.floordiv, operator.truediv: operator.truediv,
          operator.pow: operator.pow,
          torch.add: operator.add, torch.mul: operator.mul, torch.div: operator.truediv}
_ARITH_METHODS = {"add": operator.add, "add_": operator.add, "mul": operator.mul,
                  "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv}
_NUMERIC = {math.sqrt, math.log, math.exp, float, int, abs, round}  # on Python numbers only
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d}
_AVG_POOLS = {F.avg_pool1d, F.avg_pool2d}
_CAT = {torch.cat, torch.concat, torch.concatenate}
# a mask stays a mask (comparing or negating a causal buffer before masked_fill)
_MASK_METHODS = {"bool", "logical_not", "eq", "ne", "__invert__", "to"}
_MASK_FUNCTIONS = {operator.eq, operator.ne, operator.invert, torch.logical_not, torch.eq,
                   torch.ne}
# width of the token sequence that a module makes its own input nodes for
_TOKEN_WIDTH = {
    models.SelfAttention: lambda m: m.queries.in_features,
    models.TransformerBlock: lambda m: m.fc2.out_features,
    nn.TransformerEncoderLayer: lambda m: m.self_attn.embed_dim,
    nn.TransformerEncoder: lambda m: m.layers[0].self_attn.embed_dim,
    nn.MultiheadAttention: lambda m: m.embed_dim,
}


def _arg(args, kwargs, i: int, name: str, default=None):
    """Argument ``name``, given by keyword or at position ``i``."""
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    try:
        return _get_qualified_name(t)
    except Exception:  # noqa: BLE001 - fall back to the plain name
        return getattr(t, "__name__", repr(t))


class _FxConverter(FxState):
    """Evaluates the traced graph node by node on abstract values (see ``_fx_values``)."""

    def __init__(self, model: nn.Module, b: Builder, example_input=None) -> None:
        super().__init__(b)
        self.model = model
        self.called: dict[str, str] = {}  # path of a module with parameters -> first fx node
        try:
            graph = _Tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
            raise ConversionError(
                f"torch.fx cannot trace {type(model).__qualname__} (no fx node to name): "
                f"{type(e).__name__}: {e}") from None
        self.gm = fx.GraphModule(model, graph)
        if example_input is None:
            self.args = ()
        else:
            self.args = example_input if isinstance(example_input, tuple) else (example_input,)
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

    # -- where we are ----------------------------------------------------------------------
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

    def _own(self, module: nn.Module, path: str) -> None:
        """A module with parameters runs once, and its parameters belong to one path."""
        if next(module.parameters(), None) is None:
            return
        if path in self.called:
            raise Unsupported(f"module {path!r} is called a second time (first by fx node "
                              f"{self.called[path]!r}): shared weights are not supported")
        self.called[path] = self.node.name
        if next(module.parameters(recurse=False), None) is not None:
            first = self.b.owners.setdefault(id(module), path)
            if first != path:
                raise Unsupported(f"module {path!r} is the same object as {first!r}: shared "
                                  "(tied) weights are not supported")
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            self.b.claim(f"{path}.{name}", t)

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> Stream:
        env: dict[fx.Node, object] = {}
        result = None
        placeholders = 0
        for node in self.gm.graph.nodes:
            self.clock += 1
            self.node = node
            self.path = self._module_of(node)[0].strip("'")
            try:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "placeholder":
                    placeholders += 1
                    env[node] = Input(self._rank()) if placeholders == 1 else Opaque(
                        "an extra model input")
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
            except (Unsupported, ConversionError) as e:
                raise ConversionError(f"{self.where(node)}: {e}") from None
        return result

    def _rank(self) -> int | None:
        return self.args[0].dim() if self.args and isinstance(self.args[0], Tensor) else None

    def _output(self, value) -> Stream:
        if isinstance(value, (tuple, list)):
            if len(value) != 1:
                raise Unsupported("a forward returning several tensors is not supported")
            value = value[0]
        s = self.tensor(value)
        if s.stream.nodes.numel() and bool(
                (self.b.node_values("node_type", s.stream.nodes) == NodeType.INPUT).all()):
            raise Unsupported("the output is the model input")
        return s.stream

    def _get_attr(self, target: str) -> Param:
        owner, _, attr = target.rpartition(".")
        value = getattr(self.gm.get_submodule(owner), attr)
        if not isinstance(value, Tensor):
            raise Unsupported(f"attribute {target!r} is not a tensor")
        return Param(target, value, "parameter" if isinstance(value, nn.Parameter) else "buffer")

    # -- module inputs ---------------------------------------------------------------------
    @staticmethod
    def _input_spec(m: nn.Module, inp: Input) -> tuple[str, int, bool] | None:
        """``(kind, width, tokens)`` of the input nodes for module ``m`` reading the model
        input, or ``None`` where ``m``'s converter makes its own."""
        tokens = inp.tokens
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
        if t is models.TransformerClassifier and m.embedding is None:
            return "vector", m.norm.normalized_shape[0], True
        width = _TOKEN_WIDTH.get(t)
        return None if width is None else ("vector", width(m), True)

    def _value_in(self, x, m: nn.Module, path: str, mixed_ok: bool = False) -> TensorValue | None:
        """The value module ``m`` reads (``None``: it makes its own input nodes)."""
        if isinstance(x, Input) and x.value is None:
            spec = self._input_spec(m, x)
            if x.flat and (spec is None or type(m) is not nn.Linear):
                raise Unsupported(f"the flattened model input feeds {type(m).__name__}; only a "
                                  "Linear may read it")
            if x.taken is not None:
                raise Unsupported(f"the model input feeds {path!r} and {x.taken!r}")
            if spec is None:
                x.taken = path
                return None
            kind, width, tokens = spec
            x.value = self.new(_inputs(self.b, width, kind, tokens))
        if isinstance(x, Input) and x.flat:
            if type(m) is not nn.Linear:
                raise Unsupported(f"the flattened model input feeds {type(m).__name__}")
            val = x.value
        else:
            val = self.tensor(x)
        if val.stream.perm == MIXED and not mixed_ok:
            raise Unsupported(f"a concatenation of branches feeds {type(m).__name__}: the "
                              "branches' units permute independently, which it does not allow")
        self.read(val)
        return val

    # -- dispatch --------------------------------------------------------------------------
    def _call_module(self, target: str, args, kwargs):
        m = self.gm.get_submodule(target)
        t = type(m)
        self._own(m, target)
        x = args[0] if args else None
        if t is nn.Linear:
            if isinstance(x, Merged):
                return self._emit_attention(x, m, target)
            return Pending(m, target, self._value_in(x, m, target, mixed_ok=True))
        if t in _ACTIVATIONS:
            act = _ACTIVATIONS[t]
            return x if act == Act.IDENTITY else ops.activate(self, x, act)
        if t in _NO_OPS:
            return x
        if t is nn.Flatten:
            return shapes.flatten(self, x, m.start_dim, m.end_dim)
        if t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
            return shapes.adaptive_pool(self, x, m.output_size)
        if t in (nn.AvgPool1d, nn.AvgPool2d):
            return shapes.alias(self, x, spatial=None)
        if t is models.MeanPool:
            return shapes.mean(self, x, m.dim, False)
        if t is nn.MultiheadAttention:
            return self._mha(m, target, args, kwargs)
        if t in _CONVERTERS:
            if len(args) != 1 or kwargs:
                raise Unsupported(f"{t.__name__} called with extra arguments "
                                  f"{list(kwargs) or len(args) - 1}; only the input is supported")
            mixed_ok = t in (nn.Conv1d, nn.Conv2d, models.SelfAttention)
            v = self._value_in(x, m, target, mixed_ok)
            return self.new(convert(self.b, m, target, None if v is None else v.stream))
        raise Unsupported(f"unsupported module {target!r} of type {t.__qualname__}; supported: "
                          f"{', '.join(SUPPORTED)}")

    def _emit_attention(self, merged: Merged, out: nn.Linear, path: str) -> TensorValue:
        stream = attention.emit_attention(self.b, merged.core, out, path)
        for h in merged.core.heads:  # emitting changes no versions: checking after is the same
            self.check_current(h.proj.src)
        return self.new(stream)

    def _mha(self, m: nn.MultiheadAttention, target: str, args, kwargs) -> Items:
        names = ("query", "key", "value")
        values = list(args[:3]) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        if len(values) != 3 or len(args) > 3:
            raise Unsupported("MultiheadAttention must be called as (query, key, value, ...) "
                              "with keyword options")
        for key, val in kwargs.items():
            if key in names or key in ("need_weights", "average_attn_weights"):
                continue
            if val is not None and val is not False:
                raise Unsupported(f"MultiheadAttention option {key}={val!r} is not supported")
        streams = tuple(self._value_in(x, m, target, mixed_ok=True).stream for x in values)
        out = self.new(_mha_on(self.b, m, target, streams))
        return Items((out, Opaque("attention weights")))

    def _call_method(self, name: str, args, kwargs):
        x, rest = args[0], args[1:]
        if name in _ACT_METHODS and not rest:
            return ops.activate(self, x, _ACT_METHODS[name])
        if name == "contiguous":
            return x
        if name == "size":
            shape = shapes.shape(self, x)
            dim = _arg(rest, kwargs, 0, "dim")
            return shape if dim is None else shape[dim]
        if name in ("view", "reshape"):
            return shapes.reshape(self, x, rest)
        if name == "flatten":
            return shapes.flatten(self, x, *rest, **kwargs)
        if name == "transpose":
            return attention.transpose(x, *rest)
        if name == "permute":
            return attention.permute(x, rest[0] if len(rest) == 1 else rest)
        if name == "mean":
            return shapes.mean(self, x, _arg(rest, kwargs, 0, "dim"),
                               _arg(rest, kwargs, 1, "keepdim", False))
        if name == "softmax":
            return attention.softmax(x, _arg(rest, kwargs, 0, "dim"))
        if name in _ARITH_METHODS and len(rest) == 1 and not kwargs:
            return ops.arith(self, _ARITH_METHODS[name], x, rest[0])
        if name == "matmul":
            return attention.matmul(x, rest[0])
        if name in ("split", "chunk"):
            return attention.cut(x, _arg(rest, kwargs, 0, "split_size" if name == "split"
                                         else "chunks"), _arg(rest, kwargs, 1, "dim", 0), name)
        if name == "unbind":
            return attention.unbind(x, _arg(rest, kwargs, 0, "dim", 0))
        if name in ("masked_fill", "masked_fill_"):
            return self._masked_fill(x, _arg(rest, kwargs, 0, "mask"),
                                     _arg(rest, kwargs, 1, "value"))
        if name in _MASK_METHODS:
            return ops.mask_op(name, x, *rest, *kwargs.values())
        raise Unsupported(f"method {name!r} on {describe(x)} is not supported")

    @staticmethod
    def _masked_fill(x, mask, value):
        if not is_num(value):
            raise Unsupported(f"masked_fill with the value {describe(value)}: only a number")
        return attention.masked(x, attention.as_mask(mask))

    def _call_function(self, fn, args, kwargs):
        if fn in _ACT_FUNCTIONS:
            # leaky_relu's slope and gelu's approximation are kept by the module's code
            if fn not in (F.leaky_relu, F.gelu) and (len(args) > 1 or set(kwargs) - {"inplace"}):
                raise Unsupported(f"extra arguments {args[1:]} {kwargs}")
            return ops.activate(self, args[0], _ACT_FUNCTIONS[fn])
        if fn in _ARITH:
            if fn in (torch.add, torch.mul, torch.div) and (kwargs or len(args) != 2):
                raise Unsupported(f"{fn.__name__} with options {kwargs}")
            return ops.arith(self, _ARITH[fn], *args)
        if fn in _NUMERIC and all(is_num(resolve(a)) for a in args) and not kwargs:
            return fn(*(resolve(a) for a in args))
        if fn is operator.getitem:
            return self._getitem(*args)
        if fn is getattr:
            return self._getattr(*args)
        if fn in _DROPOUTS:
            return args[0]
        if fn in _AVG_POOLS:
            return shapes.alias(self, args[0], spatial=None)
        if fn in _CAT:
            return ops.cat(self, *args, **kwargs)
        if fn is torch.flatten:
            return shapes.flatten(self, *args, **kwargs)
        if fn is torch.mean:
            return shapes.mean(self, args[0], _arg(args, kwargs, 1, "dim"),
                               _arg(args, kwargs, 2, "keepdim", False))
        if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
            return shapes.adaptive_pool(self, args[0], _arg(args, kwargs, 1, "output_size"))
        if fn in (torch.matmul, operator.matmul):
            return attention.matmul(*args)
        if fn in (F.softmax, torch.softmax):
            return attention.softmax(args[0], _arg(args, kwargs, 1, "dim"))
        if fn is F.scaled_dot_product_attention:
            return attention.sdpa(args, kwargs)
        if fn is torch.transpose:
            return attention.transpose(*args)
        if fn is torch.permute:
            return attention.permute(args[0], args[1])
        if fn is torch.split:
            return attention.cut(args[0], _arg(args, kwargs, 1, "split_size_or_sections"),
                                 _arg(args, kwargs, 2, "dim", 0), "split")
        if fn is torch.chunk:
            return attention.cut(args[0], _arg(args, kwargs, 1, "chunks"),
                                 _arg(args, kwargs, 2, "dim", 0), "chunk")
        if fn is torch.unbind:
            return attention.unbind(args[0], _arg(args, kwargs, 1, "dim", 0))
        if fn is torch.masked_fill:
            return self._masked_fill(args[0], _arg(args, kwargs, 1, "mask"),
                                     _arg(args, kwargs, 2, "value"))
        if fn in _MASK_FUNCTIONS:
            return ops.mask_op(_target_name(self.node), *args, *kwargs.values())
        if fn is not None and fn is _rearrange():
            return einops.rearrange(args[0], *args[1:], **kwargs)
        raise Unsupported("unsupported function")

    def _getitem(self, x, index):
        if isinstance(x, (tuple, list, InShape)):
            return x[index]
        if isinstance(x, Items):
            item = x.items[index]
            if isinstance(item, Opaque):
                raise Unsupported(f"{item.what} are not supported")
            return item
        if isinstance(x, Param):
            try:
                return ops.param_slice(x, index)
            except Unsupported as e:
                if x.kind != "buffer":
                    raise
                try:  # a buffer cut to the sequence length: an attention mask
                    return attention.as_mask(x)
                except Unsupported as mask_error:
                    raise Unsupported(f"{e}; as an attention mask: {mask_error}") from None
        if isinstance(x, Heads) and x.axes[0] == "P":
            return attention.piece(x, index)
        raise Unsupported(f"indexing {describe(x)} with {index!r} is not supported")

    def _getattr(self, x, name: str):
        if name == "shape":
            return shapes.shape(self, x)
        if name == "mT" and isinstance(x, Heads):
            return attention.transpose(x, -2, -1)
        raise Unsupported(f"attribute {name!r} of {describe(x)} is not supported")


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
