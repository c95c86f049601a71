"""neuralgraph_quasi: graph metanetworks on neural-network weights, with quasi-equivariance."""

from ._errors import ConversionError
from .graph import NeuralGraph, collate, draw, to_graph, to_graphs, to_model, to_networkx

__version__ = "0.1.0"

__all__ = ["NeuralGraph", "ConversionError", "to_graph", "to_graphs", "to_model", "collate",
           "to_networkx", "draw"]
