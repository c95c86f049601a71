"""Metanetwork building blocks on :class:`~neuralgraph_quasi.NeuralGraph` batches."""

from ._statnn import StatNN
from ._stats import NUM_STATS, QUANTILES, TensorStatistics, tensor_statistics

__all__ = ["tensor_statistics", "TensorStatistics", "QUANTILES", "NUM_STATS", "StatNN"]
