"""Model zoos as datasets of :class:`~neuralgraph_quasi.NeuralGraph` s, and zoo generators."""

from ._zoo import SPLITS, GraphZoo, ZooFormatError, ZooNotFoundError, ZooPart
from .transformer_zoo import SmallTransformerZoo

__all__ = ["GraphZoo", "ZooPart", "ZooNotFoundError", "ZooFormatError", "SPLITS",
           "SmallTransformerZoo"]
