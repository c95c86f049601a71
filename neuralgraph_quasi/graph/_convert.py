"""Public conversion functions: :func:`to_graph`, :func:`to_model`, :func:`to_graphs`."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._errors import ConversionError
from ._builder import Builder, Template
from ._converters import convert
from ._fx import is_direct, trace_convert
from ._schema import Act, NeuralGraph

__all__ = ["to_graph", "to_model", "to_graphs", "template", "stack_values", "StateStacker",
           "graph_from_values", "flat_from_graph"]


def template(model: nn.Module, example_input=None) -> tuple[Template, Tensor, Tensor]:
    """The graph structure of ``model``, its flat float values and its integer buffers.

    Known modules and ``nn.Sequential`` s of them convert directly; any other module is
    traced with ``torch.fx`` (``example_input``, optional, gives shapes: see
    :func:`to_graph`).
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected an nn.Module, got {type(model).__name__}")
    b = Builder()
    if is_direct(model):
        out = convert(b, model, "", None)
    else:
        out = trace_convert(b, model, example_input)
    tpl = b.finish(out, type(model).__qualname__)
    held = {p["name"] for p in tpl.params}
    missing = [name for name, _ in model.named_parameters() if name not in held]
    if missing:
        raise ConversionError(f"parameters of {type(model).__qualname__} not represented in "
                              f"the graph: {', '.join(missing)}")
    return (tpl, *b.flat_values())


def _check_finite(tpl: Template, flat: Tensor, where: str = "") -> None:
    """Raise naming the first parameter holding NaN or Inf (``flat``: ``[P]`` or ``[M, P]``)."""
    bad = ~torch.isfinite(flat)
    if not bool(bad.any()):
        return
    rows, cols = bad.reshape(-1, flat.size(-1)).nonzero(as_tuple=True)
    pid = int(torch.searchsorted(tpl.param_starts, cols[0], right=True)) - 1
    prefix = f"{where}model {int(rows[0])}: " if flat.dim() == 2 else where
    raise ConversionError(f"{prefix}parameter {tpl.params[pid]['name']!r} holds NaN or Inf "
                          "(pass allow_nonfinite=True to convert anyway)")


def graph_from_values(tpl: Template, values: Tensor, ints: Tensor,
                      proto: NeuralGraph | None = None) -> NeuralGraph:
    """A graph of ``tpl``'s structure holding flat parameter ``values`` ``[P]``.

    With ``proto`` (a graph of the same template), the result is a shallow copy
    of it that shares its structure tensors and spec: building a ``Data``
    attribute by attribute costs ~10x more and dominated bulk conversion.
    """
    edge_attr, x = tpl.materialize(values)
    return _graph(tpl, edge_attr, x, ints, proto)


def _graph(tpl: Template, edge_attr: Tensor, x: Tensor, ints: Tensor,
           proto: NeuralGraph | None = None) -> NeuralGraph:
    if proto is None:
        return NeuralGraph(x=x, edge_attr=edge_attr, int_buffers=ints, spec=tpl.spec,
                           num_nodes=x.size(0), **tpl.structure)
    graph = copy.copy(proto)
    graph["x"] = x
    graph["edge_attr"] = edge_attr
    graph["int_buffers"] = ints
    return graph


def to_graph(model: nn.Module, example_input=None, allow_nonfinite: bool = False
             ) -> NeuralGraph:
    """Convert a network to a :class:`NeuralGraph`.

    Args:
        model: an ``nn.Sequential`` (nested too) of supported layers, an
            attention module, a transformer layer, one of the zoo
            architectures of :mod:`neuralgraph_quasi.models`, or any other
            ``nn.Module``, whose forward is then traced with ``torch.fx``
            (see ``docs/graph.md``).
        example_input: a tensor (or tuple of tensors) the model accepts, used
            only when tracing: its shapes tell whether the input has a token
            axis and give the spatial shape of a flattened feature map.
        allow_nonfinite: convert weights holding NaN or Inf instead of raising.

    Returns:
        a graph holding every parameter of ``model``, in its dtype.

    Raises:
        ConversionError: for an unsupported module (naming its path and
            type) or traced operation (naming the fx node, its op and target
            and the module path), a width mismatch between layers, or
            non-finite weights.
    """
    tpl, flat, ints = template(model, example_input)
    if not allow_nonfinite:
        _check_finite(tpl, flat)
    edge_attr, x = tpl.materialize(flat)
    return _graph(tpl, edge_attr, x, ints)


def to_graphs(like: nn.Module, states: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor],
              allow_nonfinite: bool = False, chunk: int = 4096, example_input=None
              ) -> list[NeuralGraph]:
    """Convert many networks of ``like``'s architecture at once.

    The structure is built once from ``like``; all values are gathered with
    one indexing operation per chunk of models, and the graphs share their
    structure tensors (treat them as read-only).

    Args:
        like: a module of the zoo's architecture (its values are ignored).
        states: a list of state_dicts, or one mapping from parameter name
            to a stacked tensor ``[M, *shape]``. Buffers of ``like`` that a
            graph does not hold (e.g. BatchNorm's ``num_batches_tracked``)
            may be present and are ignored.
        allow_nonfinite: keep models holding NaN or Inf instead of raising.
        chunk: models gathered per indexing operation (bounds memory).
        example_input: passed to the tracer for a traced ``like`` (see :func:`to_graph`).

    Raises:
        ConversionError: naming the state and key for a missing or unknown
            key or a wrong shape, or the model and parameter holding NaN/Inf.
    """
    tpl, flat, ints = stack_values(like, states, example_input)
    if not allow_nonfinite and flat.numel():
        # min and max are finite iff every value is (NaN propagates): a cheap test
        # before the exact one, which names the first bad model and parameter
        lo, hi = torch.aminmax(flat)
        if not (bool(lo.isfinite()) and bool(hi.isfinite())):
            _check_finite(tpl, flat)
    graphs: list[NeuralGraph] = []
    proto = None
    for start in range(0, flat.size(0), chunk):
        edge_attr, x = tpl.materialize(flat[start:start + chunk])
        chunk_ints = ints[start:start + chunk]
        if proto is None:
            proto = _graph(tpl, edge_attr[0], x[0], chunk_ints[0])
        # clone: a view would keep (and torch.save would write) the whole chunk
        graphs.extend(_graph(tpl, e.clone(), n.clone(), i.clone(), proto)
                      for e, n, i in zip(edge_attr, x, chunk_ints, strict=True))
    return graphs


def stack_values(like: nn.Module, states, example_input=None
                 ) -> tuple[Template, Tensor, Tensor]:
    """``like``'s template and the flat values ``[M, P]`` and integer buffers ``[M, k]``
    of many same-architecture states (see :func:`to_graphs` for ``states``)."""
    tpl, _, _ = template(like, example_input)
    ignorable = {name for name, _ in like.named_buffers()}
    return (tpl, *_stack_states(tpl, states, ignorable))


def _check_keys(tpl: Template, keys, ignorable: set[str], where: str) -> None:
    names = {p["name"] for p in tpl.params + tpl.int_params}
    for p in tpl.params + tpl.int_params:
        if p["name"] not in keys:
            raise ConversionError(f"{where}missing key {p['name']!r} for {tpl.model_type}")
    unknown = sorted(set(keys) - names - ignorable)
    if unknown:
        raise ConversionError(f"{where}unknown key {unknown[0]!r} for {tpl.model_type}")


class StateStacker:
    """Collect state_dicts of ``like``'s architecture into flat values, one row at a time.

    Memory stays at the preallocated ``[capacity, P]`` matrix plus one state: a
    zoo's checkpoints can be read and stacked in one pass without holding them all.

    >>> stacker = StateStacker.for_model(like, capacity=len(files))
    >>> for f in files:
    ...     stacker.add(torch.load(f, weights_only=True), where=f"{f}: ")
    >>> tpl, values, ints = stacker.result()
    """

    def __init__(self, tpl: Template, capacity: int, ignorable: set[str] | None = None) -> None:
        self.template = tpl
        self._ignorable = set(ignorable or ())
        self._flat = torch.empty(capacity, tpl.num_values, dtype=tpl.dtype)
        self._ints = torch.empty(capacity, sum(math.prod(p["shape"]) for p in tpl.int_params),
                                 dtype=torch.long)
        self.count = 0

    @classmethod
    def for_model(cls, like: nn.Module, capacity: int, example_input=None) -> StateStacker:
        """A stacker for ``like``'s architecture (its buffers not held by a graph may be
        present in the states and are ignored)."""
        tpl, _, _ = template(like, example_input)
        return cls(tpl, capacity, {name for name, _ in like.named_buffers()})

    def add(self, state: Mapping[str, Tensor], where: str = "") -> None:
        """Append one state_dict; errors name ``where`` (e.g. the file) and the key."""
        if self.count == self._flat.size(0):
            raise ValueError(f"StateStacker is full ({self.count} states)")
        tpl = self.template
        _check_keys(tpl, state, self._ignorable, where)
        for out, params in ((self._flat, tpl.params), (self._ints, tpl.int_params)):
            start = 0
            for p in params:
                value = state[p["name"]]
                if list(value.shape) != p["shape"]:
                    raise ConversionError(f"{where}key {p['name']!r} has shape "
                                          f"{list(value.shape)}, expected {p['shape']}")
                size = value.numel()
                out[self.count, start:start + size] = value.reshape(-1)
                start += size
        self.count += 1

    def result(self) -> tuple[Template, Tensor, Tensor]:
        """``(template, values [M, P], ints [M, k])`` of the states added so far."""
        if self.count == self._flat.size(0):
            return self.template, self._flat, self._ints
        # copies: a view of the first rows would keep (and save) the whole buffer
        return self.template, self._flat[:self.count].clone(), self._ints[:self.count].clone()


def _stack_states(tpl: Template, states, ignorable: set[str]) -> tuple[Tensor, Tensor]:
    """``[M, P]`` flat float values and ``[M, k]`` integer buffers, in template order."""
    if isinstance(states, Mapping):
        return _stack_mapping(tpl, states, ignorable)
    stacker = StateStacker(tpl, len(states), ignorable)
    for i, state in enumerate(states):
        stacker.add(state, f"state {i}: ")
    return stacker.result()[1:]


def _stack_mapping(tpl: Template, stacked: Mapping[str, Tensor],
                   ignorable: set[str]) -> tuple[Tensor, Tensor]:
    _check_keys(tpl, stacked, ignorable, "")
    described = tpl.params + tpl.int_params
    counts = {int(stacked[p["name"]].size(0)) for p in described}
    if len(counts) > 1:
        raise ConversionError(f"stacked states disagree on the number of models: {counts}")
    count = counts.pop() if counts else 0

    def columns(params: list[dict], dtype: torch.dtype) -> Tensor:
        cols = []
        for p in params:
            t = stacked[p["name"]]
            if list(t.shape[1:]) != p["shape"]:
                raise ConversionError(f"key {p['name']!r}: shape {list(t.shape[1:])} per model, "
                                      f"expected {p['shape']}")
            cols.append(t.reshape(count, math.prod(p["shape"])).to(dtype))
        return torch.cat(cols, dim=1) if cols else torch.zeros(count, 0, dtype=dtype)

    return columns(tpl.params, tpl.dtype), columns(tpl.int_params, torch.long)


def _starts(params: list[dict]) -> Tensor:
    sizes = torch.tensor([math.prod(p["shape"]) for p in params], dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])


def flat_from_graph(graph: NeuralGraph) -> Tensor:
    """The flat parameter vector ``[P]`` (in ``graph.params`` order) a graph holds.

    The inverse of :func:`graph_from_values`: every value is written back to the
    place its ``*_param``/``*_offset`` address names, so node and edge order do
    not matter.
    """
    starts = _starts(graph.params)
    flat = graph.edge_attr.new_zeros(int(starts[-1]))
    pid = graph.edge_param
    has = pid >= 0
    length = graph.edge_kshape.prod(-1)
    width = graph.edge_attr.size(1)
    cols = torch.arange(width)
    mask = has[:, None] & (cols < length[:, None])
    pos = starts[pid.clamp(min=0)][:, None] + graph.edge_offset[:, None] + cols
    flat[pos[mask]] = graph.edge_attr[mask]
    nmask = graph.node_param >= 0
    npos = starts[graph.node_param.clamp(min=0)] + graph.node_offset
    flat[npos[nmask]] = graph.x[nmask]
    return flat


def _fingerprint(structure: Mapping[str, Tensor]) -> tuple:
    """Order-free summary of a structure (invariant to re-indexing nodes and edges)."""
    return (
        tuple(torch.bincount(structure["node_type"], minlength=7).tolist()),
        tuple(torch.bincount(structure["edge_type"], minlength=11).tolist()),
        int(structure["node_type"].numel()),
    )


def _check_activations(graph: NeuralGraph, tpl: Template) -> None:
    """The graph's activations, layer by layer, are those of the template module.

    Order-free (a re-indexed graph converts back too): the number of units per
    ``(node_layer, node_act)`` must agree. A mismatch names the layer by the parameter
    whose weights feed it (a Linear with Tanh where the graph has ReLU, say).
    """
    mine = {k: graph[k].cpu() for k in ("node_layer", "node_act")}
    theirs = tpl.structure
    acts = max(_top(mine["node_act"]), _top(theirs["node_act"])) + 1
    layers = max(_top(mine["node_layer"]), _top(theirs["node_layer"])) + 1

    def counts(s) -> Tensor:
        return torch.bincount(s["node_layer"] * acts + s["node_act"],
                              minlength=layers * acts).view(layers, acts)

    a, b = counts(mine), counts(theirs)
    if torch.equal(a, b):
        return
    layer = int((a != b).any(dim=1).nonzero()[0])

    def names(counts_row: Tensor) -> str:
        return ", ".join(f"{Act(i).name.lower()} on {int(n)}" for i, n in
                         enumerate(counts_row.tolist()) if n and i != Act.IDENTITY) or "none"

    raise ConversionError(
        f"activations differ at {_layer_name(tpl, layer)}: the graph has {names(a[layer])}, "
        f"the template module {names(b[layer])} (units per activation)")


def _top(t: Tensor) -> int:
    return int(t.max()) if t.numel() else 0


def _layer_name(tpl: Template, layer: int) -> str:
    """``layer`` of a template, named by the parameter feeding its nodes."""
    s = tpl.structure
    at = (s["node_layer"] == layer).nonzero().view(-1)
    into = torch.isin(s["edge_index"][1], at) & (s["edge_param"] >= 0)
    pids = s["edge_param"][into]
    if not pids.numel():
        pids = s["node_param"][at].view(-1)
        pids = pids[pids >= 0]
    if not pids.numel():
        return f"layer {layer}"
    name = tpl.params[int(pids.min())]["name"]
    return f"layer {layer} (module {name.rpartition('.')[0] or '<root>'!r}, fed by {name!r})"


def to_model(graph: NeuralGraph, like: nn.Module, example_input=None) -> nn.Module:
    """A deep copy of ``like`` whose parameters all come from ``graph``.

    Only ``like``'s structure is used; its values are ignored. A traced ``like``
    takes the ``example_input`` it was converted with, if any. The result's
    values are bit-for-bit those the graph holds, in the graph's dtype (when
    the graph still has the dtype it was created with, each parameter gets
    back its own original dtype).

    Raises:
        ConversionError: if ``like`` does not match the graph, naming the
            first mismatching parameter and both shapes, or the first layer
            whose activations differ from the graph's.
    """
    if not isinstance(graph.spec, str):
        raise ConversionError("to_model takes one graph; split a batch with to_data_list()")
    tpl, _, _ = template(like, example_input)
    held = {p["name"]: p for p in graph.params}
    for p in tpl.params:
        q = held.get(p["name"])
        if q is None:
            raise ConversionError(f"parameter {p['name']!r} (shape {tuple(p['shape'])}) of the "
                                  f"template module is not in the graph")
        if q["shape"] != p["shape"]:
            raise ConversionError(f"parameter {p['name']!r}: the graph holds shape "
                                  f"{tuple(q['shape'])}, the template module has "
                                  f"{tuple(p['shape'])}")
    extra = [name for name in held if name not in {p["name"] for p in tpl.params}]
    if extra:
        raise ConversionError(f"parameter {extra[0]!r} of the graph (shape "
                              f"{tuple(held[extra[0]]['shape'])}) is not in the template module")
    mine = _fingerprint({k: getattr(graph, k) for k in ("node_type", "edge_type")})
    if mine != _fingerprint(tpl.structure):
        raise ConversionError(f"graph structure (nodes/edges per type {mine}) does not match "
                              f"the template module's {_fingerprint(tpl.structure)}")
    _check_activations(graph, tpl)
    masks = graph._spec().get("attention_masks", {})
    if masks != tpl.masks:
        path = sorted(k for k in set(masks) | set(tpl.masks)
                      if masks.get(k) != tpl.masks.get(k))[0]
        raise ConversionError(f"attention {path!r} is masked differently: the graph has "
                              f"{masks.get(path) or 'no mask'}, the template module "
                              f"{tpl.masks.get(path) or 'no mask'}")

    starts = _starts(graph.params).tolist()
    flat = flat_from_graph(graph)
    restore = str(graph.edge_attr.dtype).removeprefix("torch.") == graph._spec()["dtype"]
    model = copy.deepcopy(like)
    for p, start, end in zip(graph.params, starts[:-1], starts[1:], strict=True):
        value = flat[start:end].reshape(p["shape"])
        if restore:
            value = value.to(getattr(torch, p["dtype"]))
        _assign(model, p["name"], value.clone())
    ints = getattr(graph, "int_buffers", None)
    int_params = graph._spec().get("int_buffers", [])
    if [p["name"] for p in int_params] != [p["name"] for p in tpl.int_params]:
        raise ConversionError(f"integer buffers of the graph {[p['name'] for p in int_params]} "
                              f"do not match the template module's "
                              f"{[p['name'] for p in tpl.int_params]}")
    start = 0
    for p in int_params:
        size = math.prod(p["shape"])
        _assign(model, p["name"], ints[start:start + size].reshape(p["shape"])
                .to(getattr(torch, p["dtype"])).clone())
        start += size
    return model


def _assign(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = value
