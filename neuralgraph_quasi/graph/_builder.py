"""Incremental, vectorised construction of a :class:`NeuralGraph`.

Converters (``_converters.py``) describe a network layer by layer: they add
blocks of nodes and edges whose values are *addresses* into the network's
parameter tensors (parameter id, flat offset, length). No value is read while
the structure is built; :class:`Template` gathers all values in one indexing
operation at the end, so the same template converts one model or a whole zoo
of same-architecture models (:func:`~neuralgraph_quasi.graph.to_graphs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .._errors import ConversionError
from ._schema import NUM_SLOTS, Act, NodeType

__all__ = ["Builder", "Stream", "Template", "FIXED", "MIXED"]

FIXED = 0  # permutation class of units no symmetry may move (inputs, outputs)
MIXED = -2  # the "class" of a concatenation of blocks of different classes (see Stream.parts)


@dataclass(frozen=True)
class Stream:
    """The activation vector flowing between modules: which nodes hold it.

    Attributes:
        nodes: node ids, in the order of the tensor's feature/channel axis.
        kind: ``"vector"`` (features on the last axis), ``"conv1d"``/``"conv2d"``
            (channels on axis 1), or ``"flat"`` (a flattened channel map: each
            channel node stands for ``prod(spatial)`` consecutive features).
        perm: permutation class of ``nodes`` (see ``Builder.new_class``).
        spatial: spatial shape per channel, when known (pooled maps).
        tokens: whether a token axis precedes the feature axis.
        has_act: whether an activation was already applied to ``nodes``.
        parts: for a concatenation of blocks (``torch.cat`` in a traced forward), the
            permutation classes of its pieces, in order; ``perm`` is then ``MIXED`` and
            only weighted layers, activations and reshapes may consume the stream.
    """

    nodes: Tensor
    kind: str
    perm: int
    spatial: tuple[int, ...] | None = None
    tokens: bool = False
    has_act: bool = False
    parts: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return int(self.nodes.numel())

    def evolve(self, **changes) -> Stream:
        return replace(self, **changes)


@dataclass
class Template:
    """Structure of a graph plus the recipe that gathers its values.

    ``edge_gather[e, k]`` / ``node_gather[n, s]`` are positions in the flat
    concatenation of all parameters (``-1``: no value). ``edge_const`` is the
    fixed value of structural edges (1 for residual edges).
    """

    structure: dict[str, Tensor]
    edge_gather: Tensor
    edge_const: Tensor
    node_gather: Tensor
    params: list[dict]
    param_starts: Tensor
    dtype: torch.dtype
    model_type: str
    int_params: list[dict] = field(default_factory=list)
    #: attention masks, by module path: ``"causal"`` or ``"buffer NAME"`` (traced attention)
    masks: dict[str, str] = field(default_factory=dict)
    num_values: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_values = int(self.param_starts[-1]) if len(self.param_starts) else 0

    @property
    def spec(self) -> str:
        spec = {"params": self.params, "int_buffers": self.int_params,
                "dtype": str(self.dtype).removeprefix("torch."), "model": self.model_type}
        if self.masks:  # only then: graphs without masked attention keep their spec
            spec["attention_masks"] = self.masks
        return json.dumps(spec, separators=(",", ":"))

    def materialize(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``(edge_attr, x)`` from flat parameter values ``[P]`` or ``[M, P]``."""
        flat = flat.to(self.dtype)
        ecols = self.edge_gather.clamp(min=0)
        ncols = self.node_gather.clamp(min=0)
        emask = self.edge_gather >= 0
        nmask = self.node_gather >= 0
        if self.num_values == 0:
            flat = flat.new_zeros(*flat.shape[:-1], 1)
        edge_attr = torch.where(emask, flat[..., ecols], 0)
        const = self.edge_const.to(self.dtype)
        if bool(const.ne(0).any()):
            edge_attr[..., 0] += const
        x = torch.where(nmask, flat[..., ncols], 0)
        return edge_attr, x

    def scatter_back(self, edge_attr: Tensor, x: Tensor, edge_gather: Tensor,
                     node_gather: Tensor) -> Tensor:
        """Inverse of :meth:`materialize`: the flat parameter vector ``[P]``."""
        flat = edge_attr.new_zeros(self.num_values)
        emask = edge_gather >= 0
        flat[edge_gather[emask]] = edge_attr[..., : edge_gather.size(1)][emask]
        nmask = node_gather >= 0
        flat[node_gather[nmask]] = x[nmask]
        return flat


class Builder:
    """Collects node and edge blocks while converters walk a network."""

    def __init__(self) -> None:
        self.params: list[tuple[str, Tensor, str]] = []
        self._param_ids: dict[str, int] = {}
        self.num_nodes = 0
        self.layer = 0
        self._nodes: list[dict[str, Tensor]] = []
        self._edges: list[dict[str, Tensor]] = []
        self._slots: list[tuple[Tensor, int, int, Tensor]] = []
        self._acts: list[tuple[Tensor, int]] = []
        self._parent: list[int] = [FIXED]
        self.owners: dict[int, str] = {}  # id(module with parameters) -> its first path
        self._spans: list[tuple[int, int, str]] = []  # memory [start, end) of each tensor
        self.masks: dict[str, str] = {}  # attention module path -> its mask (see Template)
        self.int_buffers: list[tuple[str, Tensor]] = []

    # -- parameters and permutation classes ---------------------------------
    def param(self, name: str, tensor: Tensor, kind: str = "parameter") -> int:
        """Register a parameter (or buffer) tensor; returns its id."""
        if name in self._param_ids:
            return self._param_ids[name]
        if not torch.is_floating_point(tensor):
            raise ConversionError(f"parameter {name!r} has non-float dtype {tensor.dtype}")
        self._check_untied(name, tensor)
        self._param_ids[name] = len(self.params)
        self.params.append((name, tensor.detach(), kind))
        return self._param_ids[name]

    def claim(self, name: str, tensor: Tensor) -> None:
        """Reserve ``tensor``'s memory for ``name`` before it is registered (the fx converter
        claims a module's tensors when the module is called, to name that fx node)."""
        if torch.is_floating_point(tensor):
            self._check_untied(name, tensor)

    def _check_untied(self, name: str, tensor: Tensor) -> None:
        """Two names for one memory (``b.weight = a.weight``, or a view of it) would become
        two independent values in the graph: a symmetry could move them differently, and
        ``to_model`` could not give them back as one tensor."""
        if tensor.numel() == 0 or tensor.device.type == "meta" or tensor.data_ptr() == 0:
            return
        start = tensor.data_ptr()
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride(),
                                                             strict=True))
        end = start + extent * tensor.element_size()
        for lo, hi, other in self._spans:
            if start < hi and lo < end and other != name:
                raise ConversionError(
                    f"parameter {name!r} shares its memory with {other!r}: shared (tied) "
                    "weights are not supported (give each layer its own tensor)")
        self._spans.append((start, end, name))

    def int_buffer(self, name: str, tensor: Tensor) -> None:
        """Register an integer buffer (e.g. BatchNorm's ``num_batches_tracked``): kept
        verbatim in ``graph.int_buffers`` so that ``to_model`` restores it."""
        self.int_buffers.append((name, tensor.detach()))

    def new_class(self) -> int:
        """A fresh permutation class: units whose order a symmetry may change together."""
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def _find(self, c: int) -> int:
        while self._parent[c] != c:
            self._parent[c] = self._parent[self._parent[c]]
            c = self._parent[c]
        return c

    def node_values(self, key: str, ids: Tensor) -> Tensor:
        """Attribute ``key`` (e.g. ``"node_type"``, ``"node_layer"``) of nodes ``ids``."""
        return torch.cat([c[key] for c in self._nodes])[ids]

    def couple(self, a: int, b: int) -> None:
        """Units of classes ``a`` and ``b`` must be permuted together (unit i with unit i)."""
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)  # FIXED (0) always stays the root
            self._parent[hi] = lo

    # -- nodes and edges -----------------------------------------------------
    def nodes(self, count: int, type: NodeType, op: int, perm: int, *,
              head: Tensor | None = None, pos: Tensor | None = None,
              unit: Tensor | None = None) -> Tensor:
        """Add ``count`` nodes; returns their ids."""
        ids = torch.arange(self.num_nodes, self.num_nodes + count)
        self.num_nodes += count
        minus = torch.full((count,), -1, dtype=torch.long)
        self._nodes.append({
            "node_type": torch.full((count,), int(type), dtype=torch.long),
            "node_op": torch.full((count,), int(op), dtype=torch.long),
            "node_layer": torch.full((count,), self.layer, dtype=torch.long),
            "node_perm": torch.full((count,), perm, dtype=torch.long),
            "node_unit": torch.arange(count) if unit is None else unit,
            "node_head": minus if head is None else head,
            "node_pos": minus if pos is None else pos,
        })
        return ids

    def slot(self, nodes: Tensor, slot: int, pid: int, offsets: Tensor) -> None:
        """Node feature column ``slot`` of ``nodes`` holds ``param[pid].flatten()[offsets]``."""
        self._slots.append((nodes, int(slot), pid, offsets))

    def edges(self, src: Tensor, dst: Tensor, type: int, *, pid: int = -1,
              offset: Tensor | None = None,
              kshape: tuple[int, int] = (1, 1), role: int = 0,
              head: Tensor | None = None, pos: Tensor | None = None,
              const: float = 0.0) -> None:
        """Add edges ``src[i] -> dst[i]``, each holding ``kh * kw`` consecutive
        values of parameter ``pid`` from flat ``offset[i]`` (or none: ``pid=-1``)."""
        n = int(src.numel())
        length = kshape[0] * kshape[1]
        minus = torch.full((n,), -1, dtype=torch.long)
        self._edges.append({
            "src": src.reshape(-1), "dst": dst.reshape(-1),
            "edge_type": torch.full((n,), int(type), dtype=torch.long),
            "edge_role": torch.full((n,), int(role), dtype=torch.long),
            "edge_head": minus if head is None else head.reshape(-1),
            "edge_pos": minus if pos is None else pos.reshape(-1),
            "edge_layer": torch.full((n,), self.layer, dtype=torch.long),
            "edge_param": torch.full((n,), pid, dtype=torch.long),
            "edge_offset": minus if offset is None else offset.reshape(-1),
            "edge_kshape": torch.tensor(kshape, dtype=torch.long).expand(n, 2),
            "edge_len": torch.full((n,), length if pid >= 0 else 0, dtype=torch.long),
            "edge_const": torch.full((n,), float(const), dtype=torch.float64),
        })

    def activate(self, stream: Stream, act: Act, path: str) -> Stream:
        if act == Act.IDENTITY:
            return stream
        if stream.has_act:
            raise ConversionError(
                f"module {path!r}: a second activation on the same units is not supported"
            )
        self._acts.append((stream.nodes, int(act)))
        return stream.evolve(has_act=True)

    # -- assembly ------------------------------------------------------------
    def finish(self, output: Stream | None, model_type: str) -> Template:
        if output is None or self.num_nodes == 0:
            raise ConversionError(f"{model_type}: the model has no layer to convert")
        n = self.num_nodes
        nodes = {k: torch.cat([c[k] for c in self._nodes]) for k in self._nodes[0]}
        out_nodes = output.nodes
        hidden = nodes["node_type"][out_nodes] == NodeType.HIDDEN
        nodes["node_type"][out_nodes[hidden]] = int(NodeType.OUTPUT)
        for c in output.parts or (output.perm,):
            self.couple(c, FIXED)

        roots = torch.tensor([self._find(c) for c in range(len(self._parent))])
        free = torch.unique(roots[roots != FIXED])
        relabel = torch.full((len(self._parent),), -1, dtype=torch.long)
        relabel[free] = torch.arange(free.numel())
        perm = nodes["node_perm"]
        nodes["node_perm"] = torch.where(perm >= 0, relabel[roots[perm.clamp(min=0)]], -1)

        act = torch.zeros(n, dtype=torch.long)
        for ids, a in self._acts:
            act[ids] = a
        nodes["node_act"] = act

        dtype = _common_dtype([t for _, t, _ in self.params])
        sizes = torch.tensor([t.numel() for _, t, _ in self.params], dtype=torch.long)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

        node_gather = torch.full((n, NUM_SLOTS), -1, dtype=torch.long)
        for ids, slot, pid, offsets in self._slots:
            node_gather[ids, slot] = starts[pid] + offsets

        if self._edges:
            edges = {k: torch.cat([c[k] for c in self._edges]) for k in self._edges[0]}
        else:
            edges = _empty_edges()
        length = edges.pop("edge_len")
        width = max(int(length.max()) if length.numel() else 1, 1)
        cols = torch.arange(width)
        base = starts[edges["edge_param"].clamp(min=0)] + edges["edge_offset"]
        edge_gather = torch.where(cols < length[:, None], base[:, None] + cols, -1)
        const = edges.pop("edge_const")
        structure = {
            "edge_index": torch.stack([edges.pop("src"), edges.pop("dst")]),
            **edges,
            **nodes,
            "node_param": _slot_params(node_gather, starts),
        }
        structure["node_offset"] = torch.where(
            node_gather >= 0, node_gather - starts[structure["node_param"].clamp(min=0)], -1)
        params = [_describe(name, t, kind) for name, t, kind in self.params]
        ints = [_describe(name, t, "buffer") for name, t in self.int_buffers]
        return Template(structure, edge_gather, const, node_gather, params, starts, dtype,
                        model_type, ints, dict(self.masks))

    def flat_values(self) -> tuple[Tensor, Tensor]:
        """Flat float parameter values ``[P]`` and flat integer buffers ``[k]``."""
        ints = torch.cat([t.reshape(-1).long() for _, t in self.int_buffers]) \
            if self.int_buffers else torch.zeros(0, dtype=torch.long)
        if not self.params:
            return torch.zeros(0), ints
        dtype = _common_dtype([t for _, t, _ in self.params])
        return torch.cat([t.reshape(-1).to(dtype) for _, t, _ in self.params]), ints


def _describe(name: str, t: Tensor, kind: str) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "kind": kind}


def _slot_params(node_gather: Tensor, starts: Tensor) -> Tensor:
    pid = torch.searchsorted(starts, node_gather.clamp(min=0), right=True) - 1
    return torch.where(node_gather >= 0, pid, -1)


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _empty_edges() -> dict[str, Tensor]:
    e = torch.zeros(0, dtype=torch.long)
    return {
        "src": e, "dst": e, "edge_type": e, "edge_role": e, "edge_head": e, "edge_pos": e,
        "edge_layer": e, "edge_param": e, "edge_offset": e,
        "edge_kshape": torch.zeros(0, 2, dtype=torch.long), "edge_len": e,
        "edge_const": torch.zeros(0, dtype=torch.float64),
    }
