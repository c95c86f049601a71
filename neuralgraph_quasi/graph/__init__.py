"""Networks as graphs: :func:`to_graph`, :func:`to_model` and the :class:`NeuralGraph` schema."""

from ._convert import (
    StateStacker,
    flat_from_graph,
    graph_from_values,
    stack_values,
    template,
    to_graph,
    to_graphs,
    to_model,
)
from ._converters import SUPPORTED
from ._draw import draw, to_networkx
from ._schema import (
    NUM_SLOTS,
    WEIGHT_EDGE_TYPES,
    Act,
    EdgeType,
    KernelValues,
    NeuralGraph,
    NodeOp,
    NodeType,
    Role,
    Slot,
    collate,
)

__all__ = [
    "NeuralGraph",
    "KernelValues",
    "to_graph",
    "to_graphs",
    "to_model",
    "collate",
    "stack_values",
    "StateStacker",
    "graph_from_values",
    "flat_from_graph",
    "template",
    "to_networkx",
    "draw",
    "SUPPORTED",
    "NodeType",
    "NodeOp",
    "EdgeType",
    "Role",
    "Act",
    "Slot",
    "NUM_SLOTS",
    "WEIGHT_EDGE_TYPES",
]
