"""What every backbone of :class:`~neuralgraph_quasi.nn.QuasiGNN` provides.

A backbone is a stack of message-passing layers on a batch of
:class:`~neuralgraph_quasi.NeuralGraph`\\ s. It keeps a hidden state per node
``h: [|V|, H]`` and per edge ``e: [|E|, H]``. :class:`QuasiGNN` drives it layer by
layer so that the α-map can act on ``(h, e)`` between layers, exactly as a group
element acts on a graph's values: edge states ``e_ij · s_j / s_i`` on weight edges,
node states ``h_j · s_j``, attention blocks per head through ``M`` and ``N``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Backbone", "kernel_values", "pad_kernels", "weight_edge_mask"]


class Backbone(nn.Module):
    """Base class of the backbones (see the module docstring).

    Subclasses set :attr:`equivariant_to` (symmetry kinds, named as in
    :func:`~neuralgraph_quasi.symmetry.sample`, plus ``"reindex"`` implied) and
    implement :meth:`encode`, :meth:`layer`, :meth:`readout` and :meth:`edit`.

    Contract, for every kind ``k`` in :attr:`equivariant_to` and element ``g`` of it:
    ``encode`` and ``layer`` map ``(h, e)`` of ``g·θ`` to ``g·(h, e)`` of ``θ``
    (nodes and edges moved by ``g``'s node map; for ``"scale"``, node states times
    ``s_j`` and weight-edge states times ``s_j / s_i``); :meth:`readout` is invariant;
    :meth:`edit` is equivariant in the same way as the weights it edits.
    """

    #: Symmetry kinds the layers are equivariant to (re-indexing always included).
    equivariant_to: frozenset[str] = frozenset()

    def __init__(self, hidden_dim: int, num_layers: int, kernel_width: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.kernel_width = kernel_width

    #: Width of :meth:`readout`'s per-graph features.
    @property
    def readout_dim(self) -> int:
        raise NotImplementedError

    def encode(self, batch) -> tuple[Tensor, Tensor]:
        """Initial states ``(h [|V|, H], e [|E|, H])`` from the graph's values and types."""
        raise NotImplementedError

    def layer(self, index: int, batch, h: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Apply layer ``index`` (``0 <= index < num_layers``)."""
        raise NotImplementedError

    def readout(self, batch, h: Tensor, e: Tensor) -> Tensor:
        """``[B, readout_dim]`` per-graph features, invariant to :attr:`equivariant_to`."""
        raise NotImplementedError

    def edit(self, batch, h: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Updates ``(edge [|E|, kernel_width], bias [|V|])`` for the weights and biases.

        They must transform like the values they update (a weight edge like
        ``W_ij``, a bias like ``b_j``). :class:`QuasiGNN` keeps only the entries that
        hold parameter values.
        """
        raise NotImplementedError


def kernel_values(batch, width: int) -> Tensor:
    """``edge_attr`` zero-padded (never truncated) to ``width`` columns.

    Raises:
        ValueError: when the batch holds longer kernel vectors than ``width``.
    """
    return pad_kernels(batch.edge_attr, width)


def pad_kernels(edge_attr: Tensor, width: int) -> Tensor:
    """Edge vectors ``[|E|, k]`` zero-padded (never truncated) to ``width`` columns.

    Raises:
        ValueError: when ``k > width``.
    """
    k = edge_attr.size(1)
    if k > width:
        raise ValueError(f"the batch holds kernel vectors of width {k} but the model was built "
                         f"for kernel_width={width}: build it with kernel_width>={k}")
    if k == width:
        return edge_attr
    return nn.functional.pad(edge_attr, (0, width - k))


def weight_edge_mask(batch) -> Tensor:
    """``[|E|]`` True on edges that hold parameter values (the ``WEIGHT_EDGE_TYPES``)."""
    return batch.edge_param >= 0

