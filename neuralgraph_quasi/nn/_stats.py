"""Statistics of every parameter tensor of every network in a batch, by segment operations.

The input of the α-map (and of the STATNN baseline): for each weight and bias tensor of
each graph, its mean, population variance and 0/0.25/0.5/0.75/1 quantiles. Values are
read where the graph keeps them (edge vectors up to their true kernel size, node slots),
grouped into segments ``(graph, parameter id)``, and reduced with scatter operations and
one segmented sort: no loop over graphs or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from ..symmetry._memo import structural

__all__ = ["TensorStatistics", "tensor_statistics", "layer_statistics", "QUANTILES", "NUM_STATS",
           "squash"]

#: Quantile levels, as in "Quasi-Equivariant Metanetworks" (Appendix B.1).
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Statistics per tensor: mean, variance, then the quantiles.
NUM_STATS = 2 + len(QUANTILES)


@dataclass(frozen=True)
class TensorStatistics:
    """Statistics of the parameter tensors of a batch of graphs.

    Attributes:
        stats: ``[S, 7]`` mean, population variance, quantiles 0/.25/.5/.75/1 per segment.
        graph: ``[S]`` graph of each segment (0 for a single graph).
        param: ``[S]`` parameter id of each segment within its graph (``graph.params`` order).
        count: ``[S]`` number of values in each segment.
        layer: ``[S]`` ``node_layer`` where the tensor's values sit (the destination layer
            of its edges, or the layer of the nodes holding it).
        on_nodes: ``[S]`` True for tensors held in node slots (biases, norm parameters),
            False for tensors held on edges (weights).
    """

    stats: Tensor
    graph: Tensor
    param: Tensor
    count: Tensor
    layer: Tensor
    on_nodes: Tensor


@dataclass(frozen=True)
class _Segments:
    """Where every parameter value of a batch sits and which segment it belongs to: the
    structure-only part of :func:`tensor_statistics`, memoised per structure."""

    rows: Tensor  # edge of each edge-held value
    cols: Tensor  # its column in edge_attr
    nodes: Tensor  # node of each node-held value
    slots: Tensor  # its slot in x
    segment: Tensor  # [values] segment of each value
    graph: Tensor  # [S] per segment
    param: Tensor
    count: Tensor
    start: Tensor  # first position of each segment among the sorted values
    layer: Tensor
    on_nodes: Tensor


def _segments(batch) -> _Segments:
    device = batch.edge_attr.device
    node_graph = batch.batch if getattr(batch, "batch", None) is not None else \
        torch.zeros(batch.num_nodes, dtype=torch.long, device=device)
    has = batch.edge_param >= 0
    length = torch.where(has, batch.edge_kshape.prod(-1), 0)
    mask = torch.arange(batch.edge_attr.size(1), device=device) < length[:, None]
    rows, cols = mask.nonzero().unbind(1)
    nodes, slots = (batch.node_param >= 0).nonzero().unbind(1)
    graph = torch.cat([node_graph[batch.edge_index[1, rows]], node_graph[nodes]])
    param = torch.cat([batch.edge_param[rows], batch.node_param[nodes, slots]])
    layer = torch.cat([batch.edge_layer[rows], batch.node_layer[nodes]])
    on_nodes = torch.cat([torch.zeros_like(rows, dtype=torch.bool),
                          torch.ones_like(nodes, dtype=torch.bool)])
    num_params = int(param.max()) + 1 if param.numel() else 1
    keys, segment = torch.unique(graph * num_params + param, return_inverse=True)
    num_segments = keys.numel()
    count = torch.zeros(num_segments, dtype=torch.long, device=device).scatter_add_(
        0, segment, torch.ones_like(segment))
    seg_layer = scatter(layer, segment, 0, dim_size=num_segments, reduce="max")
    seg_on_nodes = scatter(on_nodes.long(), segment, 0, dim_size=num_segments,
                           reduce="max").bool()
    return _Segments(rows, cols, nodes, slots, segment, keys // num_params, keys % num_params,
                     count, torch.cumsum(count, 0) - count, seg_layer, seg_on_nodes)


def tensor_statistics(batch) -> TensorStatistics:
    """Mean, population variance and quantiles of every parameter tensor in ``batch``.

    Args:
        batch: a :class:`~neuralgraph_quasi.NeuralGraph` or a batch of them.

    Returns:
        :class:`TensorStatistics`, segments sorted by ``(graph, param)``. Quantiles
        interpolate linearly between order statistics, as :func:`torch.quantile` does.

    Which value belongs to which tensor is found once per structure
    (:func:`~neuralgraph_quasi.symmetry._memo.structural`); each call only gathers the
    values and reduces them, with no host-device synchronisation.
    """
    seg = structural(batch, "tensor_statistics", lambda: _segments(batch))
    values = torch.cat([batch.edge_attr[seg.rows, seg.cols], batch.x[seg.nodes, seg.slots]])
    segment, counts, num_segments = seg.segment, seg.count, seg.count.numel()
    mean = scatter(values, segment, 0, dim_size=num_segments, reduce="mean")
    var = scatter((values - mean[segment]) ** 2, segment, 0, dim_size=num_segments,
                  reduce="mean")

    # segmented sort: by value, then (stably) by segment
    order = torch.argsort(values)
    order = order[torch.argsort(segment[order], stable=True)]
    ordered = values[order]
    levels = _levels(values.dtype, values.device)
    position = levels[None, :] * (counts[:, None] - 1).to(values.dtype)
    lo = position.floor().long()
    hi = position.ceil().long()
    frac = position - lo.to(values.dtype)
    low, high = ordered[seg.start[:, None] + lo], ordered[seg.start[:, None] + hi]
    quantiles = low + frac * (high - low)

    stats = torch.cat([mean[:, None], var[:, None], quantiles], dim=1)
    return TensorStatistics(stats, seg.graph, seg.param, counts, seg.layer, seg.on_nodes)


_LEVELS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _levels(dtype: torch.dtype, device: torch.device) -> Tensor:
    """:data:`QUANTILES` as a tensor, made once per dtype and device (a host-to-device copy
    waits for the device)."""
    key = (dtype, device)
    if key not in _LEVELS:
        _LEVELS[key] = torch.tensor(QUANTILES, dtype=dtype, device=device)
    return _LEVELS[key]


def squash(t: Tensor) -> Tensor:
    """Signed ``log1p``: keeps statistics of very different magnitudes in range."""
    return torch.sign(t) * torch.log1p(t.abs())


def layer_statistics(stats: TensorStatistics, num_graphs: int, depth: int) -> Tensor:
    """``[B, depth, 2, 7]``: per graph and layer, the mean (squashed) statistics of the
    weight tensors (``[..., 0, :]``) and of the node-held tensors (``[..., 1, :]``).

    Layers at or past ``depth`` share the last row; absent entries are zero. Invariant to
    every permutation symmetry (statistics do not see the order of entries, and layers
    are never permuted).
    """
    layer = stats.layer.clamp(max=depth - 1)
    cell = (stats.graph * depth + layer) * 2 + stats.on_nodes.long()
    table = scatter(squash(stats.stats), cell, 0, dim_size=num_graphs * depth * 2,
                    reduce="mean")
    return table.view(num_graphs, depth, 2, NUM_STATS)
