"""The :class:`NeuralGraph` data object and the integer codes it stores.

Every attribute is documented in ``docs/graph.md``; the codes below are the
single source of truth for the integer-valued attributes.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum
from typing import Any

import torch
from torch_geometric.data import Data
from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
from torch_geometric.data.storage import GlobalStorage

__all__ = [
    "NeuralGraph",
    "NodeType",
    "NodeOp",
    "EdgeType",
    "Role",
    "Act",
    "NUM_SLOTS",
    "Slot",
    "collate",
    "WEIGHT_EDGE_TYPES",
]


class NodeType(IntEnum):
    """What a node stands for in the network."""

    INPUT = 0  #: an input feature or channel (never moved by a symmetry)
    HIDDEN = 1  #: a hidden neuron or channel
    OUTPUT = 2  #: an output feature or channel (never moved by a symmetry)
    QUERY = 3  #: one coordinate of one head's query projection
    KEY = 4  #: one coordinate of one head's key projection
    VALUE = 5  #: one coordinate of one head's value projection
    HEAD = 6  #: one attention head; linked to its Q/K/V member nodes


class NodeOp(IntEnum):
    """The operation whose output the node holds."""

    INPUT = 0
    LINEAR = 1
    CONV = 2
    EMBEDDING = 3
    ATTENTION = 4  #: Q/K/V coordinates and head nodes
    ATTENTION_OUT = 5  #: output of the attention output projection
    LAYER_NORM = 6
    BATCH_NORM = 7


class EdgeType(IntEnum):
    """What an edge stands for. Edges of the first kinds carry weights."""

    LINEAR = 0  #: one weight of a Linear layer (a block of weights after a Flatten)
    CONV = 1  #: one kernel ``W[out, in]`` of a convolution, as a vector
    EMBEDDING = 2  #: one entry ``W[token, feature]`` of an Embedding
    ATTN_Q = 3  #: one weight of a query projection
    ATTN_K = 4  #: one weight of a key projection
    ATTN_V = 5  #: one weight of a value projection
    ATTN_O = 6  #: one weight of the attention output projection
    QK_PAIR = 7  #: structural: query coordinate (head h, position a) -> key coordinate (h, a)
    HEAD_MEMBER = 8  #: structural: head node -> each of its Q/K/V coordinates
    NORM = 9  #: structural: feature i before a normalisation -> feature i after it
    RESIDUAL = 10  #: structural: a skip connection, unit i -> unit i (edge value 1)


#: Edge types whose features are values of a parameter tensor.
WEIGHT_EDGE_TYPES = (
    EdgeType.LINEAR,
    EdgeType.CONV,
    EdgeType.EMBEDDING,
    EdgeType.ATTN_Q,
    EdgeType.ATTN_K,
    EdgeType.ATTN_V,
    EdgeType.ATTN_O,
)


class Role(IntEnum):
    """Role of an attention edge (``edge_role``); ``NONE`` for all others."""

    NONE = 0
    Q = 1
    K = 2
    V = 3
    O = 4  # noqa: E741


class Act(IntEnum):
    """Elementwise activation applied to a node's value (``node_act``)."""

    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2
    TANH = 3
    SIGMOID = 4
    GELU = 5
    SILU = 6
    SINE = 7


class Slot(IntEnum):
    """Columns of the node feature matrix ``x``."""

    BIAS = 0  #: bias of the layer producing the node; beta of a normalisation
    GAIN = 1  #: weight (gamma) of a normalisation
    RUNNING_MEAN = 2  #: BatchNorm running mean
    RUNNING_VAR = 3  #: BatchNorm running variance


NUM_SLOTS = len(Slot)


class KernelValues(torch.Tensor):
    """The type of a :class:`NeuralGraph`'s ``edge_attr``: a plain tensor, except that
    ``torch.cat`` of several along their first axis pads them with zeros to the widest
    first. This is what lets PyG's own batching (``Batch.from_data_list``,
    ``torch_geometric.loader.DataLoader``) put graphs of different kernel widths in one
    batch, as :func:`collate` does. Every operation but a copy (``clone``, ``to``,
    ``detach`` ...) returns a plain tensor, so a batch's ``edge_attr`` and everything
    computed from it are plain tensors and cost nothing extra."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CATS:
            args, kwargs = _padded_cat_args(args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _COPIES and isinstance(out, torch.Tensor):
            return out.as_subclass(cls)
        return out


_CATS = {torch.cat, torch.concat, torch.concatenate}
_COPIES = {torch.Tensor.clone, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda,
           torch.Tensor.detach, torch.Tensor.contiguous, torch.Tensor.pin_memory,
           torch.Tensor.share_memory_, torch.Tensor.double, torch.Tensor.float,
           torch.Tensor.requires_grad_}


def _padded_cat_args(args, kwargs):
    tensors = args[0] if args else kwargs["tensors"]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    tensors = list(tensors)
    if (dim not in (0, -2) or len(tensors) < 2 or any(t.dim() != 2 for t in tensors)
            or len({t.size(1) for t in tensors}) == 1):
        return args, kwargs
    width = max(t.size(1) for t in tensors)
    padded = [torch.nn.functional.pad(t.as_subclass(torch.Tensor), (0, width - t.size(1)))
              for t in tensors]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("tensors", "dim", "axis", "out")}
    return (padded, 0), kwargs  # `out` (PyG's shared memory in workers) has the old shape


class _GraphStorage(GlobalStorage):
    """A graph's attribute storage: ``edge_attr`` is kept a :class:`KernelValues` however
    it is set (attribute, item, ``to``/``clone``, or PyG's ``to_data_list`` writing into
    the storage)."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _kernels(value) if key == "edge_attr" else value)


def _kernels(value):
    if isinstance(value, torch.Tensor) and type(value) is not KernelValues:
        return value.as_subclass(KernelValues)
    return value


class NeuralGraph(Data):
    r"""A neural network as a graph: a node per neuron or channel, an edge per weight.

    A :class:`torch_geometric.data.Data` whose attributes are described in
    ``docs/graph.md``. Built by :func:`~neuralgraph_quasi.to_graph`, turned
    back into a module by :func:`~neuralgraph_quasi.to_model`. Graphs of
    different architectures batch with :func:`~neuralgraph_quasi.collate`,
    :meth:`torch_geometric.data.Batch.from_data_list` or PyG's ``DataLoader``:
    ``edge_attr`` is a :class:`KernelValues`, which pads kernel vectors to a
    common width when PyG concatenates them.

    Integer attributes that hold graph-local ids (``edge_param``,
    ``node_perm``, ``node_head`` ...) deliberately avoid ``index`` and
    ``batch`` in their names, so batching leaves them unshifted.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_kernel_values()

    def __setstate__(self, mapping: dict[str, Any]) -> None:
        super().__setstate__(mapping)  # graphs saved before KernelValues: plain storage
        self._keep_kernel_values()

    def _keep_kernel_values(self) -> None:
        """Hold attributes in a :class:`_GraphStorage` (not a batch: its ``edge_attr``
        stays a plain tensor)."""
        from torch_geometric.data import Batch

        old = self.__dict__.get("_store")
        if isinstance(self, Batch) or old is None or type(old) is _GraphStorage:
            return
        new = _GraphStorage(_parent=self)
        for key, value in old._mapping.items():
            new[key] = value
        self.__dict__["_store"] = new

    def __repr__(self) -> str:
        text = super().__repr__()
        if isinstance(self.get("spec"), str):
            text = re.sub(r"spec='[^']*'", f"spec=<{len(self.params)} params>", text)
        return text

    def _spec(self) -> dict[str, Any]:
        spec = self.spec
        if not isinstance(spec, str):
            raise TypeError("this is a batch of graphs: call to_data_list() first")
        return json.loads(spec)

    @property
    def params(self) -> list[dict[str, Any]]:
        """The parameter tensors the graph holds, in ``edge_param`` id order.

        Each entry has ``name``, ``shape``, ``dtype`` and ``kind``
        (``"parameter"`` or ``"buffer"``).
        """
        return self._spec()["params"]

    @property
    def kernel_width(self) -> int:
        """Width of ``edge_attr`` (the largest kernel vector, after padding)."""
        return int(self.edge_attr.size(-1))

    def pad_kernels(self, width: int) -> NeuralGraph:
        """A copy whose ``edge_attr`` is zero-padded on the right to ``width`` columns."""
        current = self.kernel_width
        if width < current:
            raise ValueError(f"cannot pad kernel vectors of width {current} down to {width}")
        out = self.clone() if width == current else self.__class__(**dict(self.items()))
        if width > current:
            pad = self.edge_attr.new_zeros(self.edge_attr.size(0), width - current)
            out.edge_attr = torch.cat([self.edge_attr, pad], dim=-1)
        return out


def collate(graphs: list[NeuralGraph]):
    """Batch graphs of possibly different architectures.

    Pads every graph's kernel vectors to the widest one, then calls
    :meth:`torch_geometric.data.Batch.from_data_list`. The true kernel shapes
    stay in ``edge_kshape``, and :meth:`~torch_geometric.data.Batch.to_data_list`
    gives graphs that convert back exactly with :func:`~neuralgraph_quasi.to_model`.
    """
    from torch_geometric.data import Batch

    if not graphs:
        raise ValueError("collate needs at least one graph")
    width = max(g.kernel_width for g in graphs)
    padded = [g if g.kernel_width == width else g.pad_kernels(width) for g in graphs]
    return Batch.from_data_list(padded)


# torch.load(weights_only=True) of a NeuralGraph needs the class and PyG's storages.
torch.serialization.add_safe_globals([NeuralGraph, GlobalStorage, DataEdgeAttr, DataTensorAttr,
                                      KernelValues, _GraphStorage])
