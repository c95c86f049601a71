"""Metanetworks on :class:`~neuralgraph_quasi.NeuralGraph` batches.

* :class:`QuasiGNN`: backbone ``β`` (:class:`MPNN`, or the scale-equivariant
  ``ScaleMPNN``), the α-map (:class:`AlphaMap`), an invariant readout or an editing head.
* Baselines: :class:`StatNN` (weight statistics), :class:`FlatMLP` (flattened weights).
* :func:`tensor_statistics`: per-tensor statistics of a batch, by segment operations.
"""

from ._alpha import Alpha, AlphaMap, statistics_per_node
from ._backbone import Backbone
from ._baselines import FlatMLP, flat_parameters
from ._compile import compile_layers
from ._gl_invariant import gl_invariant_view
from ._mpnn import MPNN, EdgeMPLayer
from ._quasi import BACKBONES, QuasiGNN
from ._statnn import StatNN
from ._stats import NUM_STATS, QUANTILES, TensorStatistics, tensor_statistics

__all__ = ["QuasiGNN", "BACKBONES", "Backbone", "MPNN", "EdgeMPLayer", "AlphaMap", "Alpha",
           "statistics_per_node", "gl_invariant_view", "StatNN", "FlatMLP", "flat_parameters",
           "tensor_statistics", "TensorStatistics", "QUANTILES", "NUM_STATS",
           "count_parameters", "compile_layers"]


def count_parameters(module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
