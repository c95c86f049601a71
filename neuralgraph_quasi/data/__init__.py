"""Model zoos as datasets of :class:`~neuralgraph_quasi.NeuralGraph` s, and zoo generators."""

from ._zoo import SPLITS, GraphZoo, ZooFormatError, ZooNotFoundError, ZooPart, split_position
from .cnn_zoo import SmallCNNZoo
from .inr_zoo import INRZoo
from .transformer_zoo import SmallTransformerZoo
from .zoos import load_zoo, make_zoo

__all__ = ["GraphZoo", "ZooPart", "ZooNotFoundError", "ZooFormatError", "SPLITS",
           "SmallTransformerZoo", "SmallCNNZoo", "INRZoo", "make_zoo", "load_zoo", "split_position"]
