r"""What the backbone reads of a network's values: per-tensor normalised weights, their
scale, and per-unit weight norms.

A zoo's weights are small (a transformer's entries are about ``0.05``), while the typed
embeddings that join them in an edge's first state are of order one: embedded linearly
and then layer-normalised, the values are a small perturbation of the type, and most of
what distinguishes one network from another (the magnitudes) is washed out. So every
parameter value is read as

* ``w / rms(T)``, its value relative to the root mean square of its own tensor ``T``
  (the tensor's scale removed), and
* ``log rms(T)``, the tensor's scale, as a separate feature of every entry of ``T``;

and every unit also sees ``log`` of the RMS of the normalised weights entering and
leaving it (how strongly it is connected relative to its layer).

All of it is invariant to the order of a tensor's entries, so permutation equivariance
is kept; none of it is scale-equivariant (the ``"scale_mpnn"`` backbone reads raw values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from ..graph._schema import NUM_SLOTS
from ..symmetry._memo import structural
from ._backbone import weight_edge_mask
from ._stats import _segments

__all__ = ["NormalisedValues", "normalised_values", "NODE_FEATURES", "EDGE_FEATURES"]

#: Extra per-node features: log RMS per slot's tensor, log RMS of incoming and outgoing
#: normalised weights.
NODE_FEATURES = NUM_SLOTS + 2
#: Extra per-edge features: log RMS of the edge's tensor.
EDGE_FEATURES = 1

#: Floor of a tensor's RMS (an all-zero tensor keeps zeros instead of dividing by zero).
_TINY = 1e-12


@dataclass(frozen=True)
class NormalisedValues:
    """The values of a batch as the backbone reads them.

    Attributes:
        edge: ``[|E|, K]`` edge vectors divided by their tensor's RMS (0 where no value).
        x: ``[|V|, NUM_SLOTS]`` node slots; parameter slots divided by their tensor's RMS,
            other slots (running statistics of a BatchNorm) unchanged.
        edge_features: ``[|E|, EDGE_FEATURES]`` ``log rms`` of each weight edge's tensor
            (0 on structural edges).
        node_features: ``[|V|, NODE_FEATURES]`` ``log rms`` of each parameter slot's tensor
            (0 where none), then ``log`` RMS of the normalised weights into and out of the
            node (0 where it has none).
    """

    edge: Tensor
    x: Tensor
    edge_features: Tensor
    node_features: Tensor


def normalised_values(batch, edge_attr: Tensor | None = None,
                      x: Tensor | None = None) -> NormalisedValues:
    """Per-tensor normalised values of ``batch`` (or of ``edge_attr``/``x`` laid out like
    the batch's, e.g. after an α-map moved them), differentiable in the values.

    Segment operations only, with the structure memoised per batch structure.
    """
    edge_attr = batch.edge_attr if edge_attr is None else edge_attr
    x = batch.x if x is None else x
    seg = structural(batch, "tensor_statistics", lambda: _segments(batch))
    values = torch.cat([edge_attr[seg.rows, seg.cols], x[seg.nodes, seg.slots]])
    num = seg.count.numel()
    ms = scatter(values * values, seg.segment, 0, dim_size=num, reduce="mean")
    rms = ms.clamp_min(_TINY).sqrt()
    log_rms = rms.log()
    normed = values / rms[seg.segment]
    split = seg.rows.numel()

    edge = torch.zeros_like(edge_attr).index_put((seg.rows, seg.cols), normed[:split])
    x_out = x.index_put((seg.nodes, seg.slots), normed[split:])
    edge_log = edge_attr.new_zeros(edge_attr.size(0)).index_put(
        (seg.rows,), log_rms[seg.segment[:split]])
    node_log = x.new_zeros(x.shape).index_put((seg.nodes, seg.slots),
                                              log_rms[seg.segment[split:]])

    weight = weight_edge_mask(batch)
    src, dst = batch.edge_index
    energy = torch.where(weight, edge.pow(2).sum(-1) / _lengths(batch), 0.0)
    counted = weight.to(energy.dtype)
    n = x.size(0)
    into = scatter(energy, dst, 0, dim_size=n, reduce="sum")
    out_of = scatter(energy, src, 0, dim_size=n, reduce="sum")
    n_in = scatter(counted, dst, 0, dim_size=n, reduce="sum")
    n_out = scatter(counted, src, 0, dim_size=n, reduce="sum")
    connected = torch.stack([
        torch.where(n_in > 0, 0.5 * (into / n_in.clamp_min(1)).clamp_min(_TINY).log(), 0.0),
        torch.where(n_out > 0, 0.5 * (out_of / n_out.clamp_min(1)).clamp_min(_TINY).log(), 0.0),
    ], dim=-1)
    return NormalisedValues(edge, x_out, edge_log[:, None],
                            torch.cat([node_log, connected], dim=-1))


def _lengths(batch) -> Tensor:
    """``[|E|]`` number of values on each edge (its kernel size; 1 for structural edges)."""
    return structural(batch, "edge_lengths",
                      lambda: batch.edge_kshape.prod(-1).clamp_min(1).to(batch.edge_attr.dtype))
