"""Model zoos as datasets of :class:`~neuralgraph_quasi.NeuralGraph` s, and zoo generators."""

from ._zoo import SPLITS, GraphZoo, ZooFormatError, ZooNotFoundError, ZooPart
from .inr_zoo import INRZoo
from .transformer_zoo import SmallTransformerZoo
from .zoos import load_zoo, make_zoo

__all__ = ["GraphZoo", "ZooPart", "ZooNotFoundError", "ZooFormatError", "SPLITS",
           "SmallTransformerZoo", "INRZoo", "make_zoo", "load_zoo"]
