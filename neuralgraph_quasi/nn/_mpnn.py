"""An edge-updating, PNA-style message-passing backbone on neural graphs."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.aggr import (
    MaxAggregation,
    MeanAggregation,
    MinAggregation,
    MultiAggregation,
    SumAggregation,
)
from torch_geometric.utils import scatter

from ..graph._schema import NUM_SLOTS, Act, NodeOp, NodeType
from ..symmetry._memo import structural
from ._backbone import Backbone, pad_kernels, weight_edge_mask
from ._gl_invariant import NUM_EDGE_CODES
from ._inputs import EDGE_FEATURES, NODE_FEATURES, normalised_values

__all__ = ["MPNN", "EdgeMPLayer", "mlp"]

#: Layer depths beyond this share one embedding.
MAX_LAYER = 63
#: Input and output units beyond this share one embedding.
MAX_IO_UNIT = 63


def mlp(in_dim: int, hidden_dim: int, out_dim: int,
        act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """Two linear layers with an activation between them."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), act(), nn.Linear(hidden_dim, out_dim))


def graph_ids(batch) -> tuple[Tensor, int]:
    """``([|V|] graph of each node, number of graphs)`` for a batch or a single graph."""
    b = getattr(batch, "batch", None)
    if b is None:
        return torch.zeros(batch.num_nodes, dtype=torch.long, device=batch.x.device), 1
    return b, int(batch.num_graphs)


def readout_nodes(batch) -> tuple[Tensor, Tensor]:
    """``(weight edges, OUTPUT nodes)`` as index tensors, memoised per batch structure (a
    boolean mask would make every readout wait for the device)."""

    def compute():
        return (weight_edge_mask(batch).nonzero().view(-1),
                (batch.node_type == NodeType.OUTPUT).nonzero().view(-1))

    return structural(batch, "readout", compute)


_HALF = (torch.float16, torch.bfloat16)
_SUMS = (SumAggregation, MeanAggregation)
_FAST = (SumAggregation, MeanAggregation, MaxAggregation, MinAggregation)


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 for the half-precision types that autocast produces: where a
    small deviation from 1 (α), a long sum or a weight passed through must not be rounded."""
    return torch.float32 if dtype in _HALF else dtype


def exact(t: Tensor) -> Tensor:
    """``t`` in float32 when autocast left it in half precision (before long sums)."""
    return t.to(exact_dtype(t.dtype))


def no_autocast(device_type: str):
    """Autocast switched off on ``device_type`` where it is on (a null context elsewhere)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _ScatterExtremum(torch.autograd.Function):
    """``scatter(src, index, reduce="max"|"min")`` along dim 0 (empty segments give 0) with a
    cheaper backward than ``scatter_reduce``'s: the gradient of each segment goes to the
    entries equal to its extremum, shared equally among ties (PyTorch's gradient, except
    where an extremum is exactly 0: ``scatter_reduce`` then counts the zero it starts from
    as one more tie), found by a gather and a comparison instead of a broadcast
    ``scatter``."""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, dim_size: int, reduce: str) -> Tensor:
        size = (dim_size, *src.shape[1:])
        wide = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
        out = src.new_zeros(size).scatter_reduce_(0, wide, src, reduce, include_self=False)
        ctx.save_for_backward(src, index, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        src, index, out = ctx.saved_tensors
        hit = (src == out.index_select(0, index)).to(grad.dtype)
        ties = torch.zeros_like(grad).index_add_(0, index, hit).clamp_(min=1)
        return hit * (grad / ties).index_select(0, index), None, None, None


def scatter_extremum(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> Tensor:
    """``[dim_size, ...]`` per-segment ``"amax"`` or ``"amin"`` of ``src`` (rows grouped by
    ``index``), 0 for empty segments: PyG's ``scatter(reduce="max"|"min")`` on the CPU, with
    a faster backward (:class:`_ScatterExtremum`)."""
    return _ScatterExtremum.apply(src, index, dim_size, reduce)


_EXTREMA = {MaxAggregation: "amax", MinAggregation: "amin"}


def aggregate_exact(layer: MessagePassing, inputs: Tensor, index: Tensor,
                    ptr: Tensor | None, dim_size: int | None) -> Tensor:
    """``layer``'s aggregation, with sums and means accumulated in float32 when the messages
    are in half precision (autocast): a node with hundreds of incoming messages would lose
    most of its bits in a bfloat16 sum. ``max``/``min`` are exact in any precision and take
    :func:`scatter_extremum` (the same values, a cheaper backward). Aggregations other than
    sum, mean, max and min: PyG's, unchanged."""
    aggr = layer.aggr_module
    half = inputs.dtype in _HALF
    multi = isinstance(aggr, MultiAggregation)
    parts = aggr.aggrs if multi else [aggr]
    cat = not multi or aggr.mode == "cat"
    if not half and not (cat and ptr is None and all(type(part) in _FAST for part in parts)):
        return MessagePassing.aggregate(layer, inputs, index, ptr, dim_size)
    if not cat:
        raise NotImplementedError(f"half-precision aggregation with mode={aggr.mode!r}")
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() else 0
    wide = inputs.float() if half else inputs
    outs = []
    for part in parts:
        if type(part) in _EXTREMA and ptr is None and layer.node_dim % inputs.dim() == 0:
            out = scatter_extremum(inputs, index, dim_size, _EXTREMA[type(part)])
        else:
            out = part(wide if isinstance(part, _SUMS) else inputs, index, ptr=ptr,
                       dim_size=dim_size, dim=layer.node_dim)
        outs.append(out.float() if half else out)
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


class EdgeMPLayer(MessagePassing):
    r"""One layer of :class:`MPNN`: an edge update, then a node update from messages
    along and against the edges, each aggregated PNA-style.

    .. math::
        e'_{ij} &= \mathrm{LN}\big(e_{ij} + W_2\,\sigma(U h_i + V h_j + W_1 e_{ij})\big) \\
        m^{\to}_{ij} &= \sigma(A h_i + B h_j) \odot (1 + \gamma^{\to}(e'_{ij}))
            + \beta^{\to}(e'_{ij}) \qquad
        m^{\leftarrow}_{ji} = \sigma(A' h_j + B' h_i) \odot (1 + \gamma^{\leftarrow}(e'_{ij}))
            + \beta^{\leftarrow}(e'_{ij}) \\
        h'_j &= \mathrm{LN}\Big(h_j + \phi\big([h_j,\ \textstyle\bigoplus_{i \to j}
            m^{\to}_{ij},\ \bigoplus_{j \to k} m^{\leftarrow}_{kj}]\big)\Big)

    for an edge ``i → j`` (from the layer below to the layer above). :math:`\bigoplus`
    concatenates several aggregations of the incoming messages (PNA's mean, max, ...);
    messages from the layer below and from the layer above are aggregated separately.
    The FiLM modulation (:math:`\gamma, \beta`) lets the edge state gate each message,
    as in neural-graphs' PNA. Linear maps of node states are applied per node before
    being gathered onto edges, which keeps the work per edge small. No input is indexed
    by unit, head or position, so the layer is equivariant to any re-indexing of nodes
    and edges.

    Args:
        hidden_dim: width ``H`` of node and edge states.
        aggregators: PyG aggregation names (default ``("mean", "max")``).

    Shapes:
        input: ``h [|V|, H]``, ``e [|E|, H]``, ``edge_index [2, |E|]``; output ``(h', e')``.
    """

    def __init__(self, hidden_dim: int, aggregators=("mean", "max")) -> None:
        super().__init__(aggr=list(aggregators), node_dim=0)
        H = hidden_dim
        self.hidden_dim = H
        self.edge_nodes = nn.Linear(H, 2 * H)  # U, V
        self.edge_self = nn.Linear(H, H)  # W_1
        self.edge_out = nn.Linear(H, H)  # W_2
        self.message_nodes = nn.Linear(H, 4 * H)  # A, B, A', B'
        self.film = nn.Linear(H, 4 * H)  # γ→, β→, γ←, β←
        self.node_mlp = mlp((1 + 2 * len(aggregators)) * H, H, H)
        self.edge_norm = nn.LayerNorm(H)
        self.node_norm = nn.LayerNorm(H)
        # 1 on FiLM's γ rows (not a parameter, not saved): adds the 1 of 1 + γ to its bias
        self.register_buffer("film_one", torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat_interleave(H),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for module in (self.edge_nodes, self.edge_self, self.edge_out, self.message_nodes,
                       self.film, self.node_mlp[0], self.node_mlp[2], self.edge_norm,
                       self.node_norm):
            module.reset_parameters()

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        # The same function as the formulas above, arranged for fewer, larger kernels:
        # the six node maps are one matrix product, with the maps gathered at an edge's
        # source ([U, A, B']) and at its target ([V, B, A']) side by side, so that one
        # gather per end and one addition give U h_i + V h_j and both messages'
        # pre-activations; FiLM's 1 + γ is folded into its bias, and a message is one
        # fused multiply-add. Tensors are cut with split (whose backward is one cat), not
        # slices (whose backward fills a zero tensor of the whole input per slice).
        H, num_nodes = self.hidden_dim, h.size(0)
        src, dst = edge_index[0], edge_index[1]
        weight, bias = self._node_maps()
        at_src, at_dst = nn.functional.linear(h, weight, bias).split(3 * H, dim=-1)
        edge_pre, up_pre, down_pre = (at_src.index_select(0, src)
                                      + at_dst.index_select(0, dst)).split(H, dim=-1)
        hidden = nn.functional.silu(edge_pre + self.edge_self(e))
        e = self.edge_norm(e + self.edge_out(hidden))
        gain, shift, gain_rev, shift_rev = nn.functional.linear(
            e, self.film.weight, self._film_bias()).split(H, dim=-1)
        # each direction's messages contiguous and aggregated on their own: a scatter into
        # rows in index order (targets of edges sorted by target) is the cheapest
        up = self.aggregate(torch.addcmul(shift, nn.functional.silu(up_pre), gain), dst,
                            dim_size=num_nodes)
        down = self.aggregate(torch.addcmul(shift_rev, nn.functional.silu(down_pre), gain_rev),
                              src, dim_size=num_nodes)
        h = self.node_norm(h + self.node_mlp(torch.cat([h, up, down], dim=-1)))
        return h, e

    def _node_maps(self) -> tuple[Tensor, Tensor]:
        """``[U; A; B'; V; B; A']`` and their biases: rows gathered at sources, then targets."""
        H = self.hidden_dim
        order = (self.edge_nodes, 0), (self.message_nodes, 0), (self.message_nodes, 3), \
            (self.edge_nodes, 1), (self.message_nodes, 1), (self.message_nodes, 2)
        weight = torch.cat([lin.weight[k * H:(k + 1) * H] for lin, k in order])
        bias = torch.cat([lin.bias[k * H:(k + 1) * H] for lin, k in order])
        return weight, bias

    def _film_bias(self) -> Tensor:
        """FiLM's bias ``[γ→; β→; γ←; β←]`` with 1 added to the γ parts: ``1 + γ`` from the
        matrix product."""
        return self.film.bias + self.film_one.to(self.film.bias.dtype)

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Tensor | None = None,
                  dim_size: int | None = None) -> Tensor:
        return aggregate_exact(self, inputs, index, ptr, dim_size)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden_dim}, aggr={self.aggr})"


class MPNN(Backbone):
    r"""Permutation-equivariant message passing on neural graphs (``backbone="mpnn"``).

    Typed embeddings give every node its type, operation, activation and depth (and,
    for input and output units, which are never permuted, their own index, as
    neural-graphs' positional embeddings do); node values (bias, gain, running
    statistics) and edge values (a weight, or a kernel vector of up to
    ``kernel_width`` entries) are embedded linearly. Then ``num_layers``
    :class:`EdgeMPLayer`\ s update node and edge states. Sparse throughout: no dense
    ``|V| × |V|`` tensor, no loop over graphs.

    Equivariant to re-indexing, hence to ``permutation`` and ``head_permutation``
    (which are re-indexings of the values); not to scalings, sign flips or GL factors.

    With ``value_norm=True`` (the default) values are read per tensor
    (:func:`~neuralgraph_quasi.nn.normalised_values`): each entry relative to its
    tensor's RMS, the tensor's log-RMS as a feature of its entries, and each unit's
    log-RMS of incoming and outgoing weights; ``value_norm=False`` embeds raw values.

    Args:
        hidden_dim: width of node and edge states.
        num_layers: message-passing layers.
        kernel_width: longest edge vector accepted (9 for 3×3 kernels).
        value_norm: read per-tensor normalised values and their scales (see above).
        aggregators: PyG aggregation names of every layer (PNA-style).
    """

    equivariant_to = frozenset({"permutation", "head_permutation"})

    def __init__(self, hidden_dim: int, num_layers: int, kernel_width: int = 9,
                 value_norm: bool = True, aggregators=("mean", "max")) -> None:
        super().__init__(hidden_dim, num_layers, kernel_width)
        H = hidden_dim
        self.value_norm = value_norm
        self.aggregators = tuple(aggregators)
        self.node_type = nn.Embedding(len(NodeType), H)
        self.node_op = nn.Embedding(len(NodeOp), H)
        self.node_act = nn.Embedding(len(Act), H)
        self.node_layer = nn.Embedding(MAX_LAYER + 1, H)
        self.io_unit = nn.Embedding(2 * (MAX_IO_UNIT + 1), H)
        self.node_values = nn.Linear(NUM_SLOTS, H)
        self.edge_type = nn.Embedding(NUM_EDGE_CODES, H)  # incl. GL-invariant product edges
        self.edge_values = nn.Linear(kernel_width, H)
        if value_norm:
            self.node_scales = nn.Linear(NODE_FEATURES, H)
            self.edge_scales = nn.Linear(EDGE_FEATURES, H)
        self.layers = nn.ModuleList(EdgeMPLayer(H, self.aggregators) for _ in range(num_layers))
        self.pool = mlp(4 * H, H, H)
        self.edit_edges = mlp(H, H, kernel_width)
        self.edit_nodes = mlp(H, H, 1)

    @property
    def readout_dim(self) -> int:
        return self.hidden_dim

    def encode(self, batch, edge_attr: Tensor | None = None,
               x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Initial states; ``edge_attr``/``x`` replace the batch's values when given (the
        values an α-map moved)."""
        edge_attr = batch.edge_attr if edge_attr is None else edge_attr
        x = batch.x if x is None else x
        kind = batch.node_type
        unit = batch.node_unit.clamp(max=MAX_IO_UNIT)
        io = torch.where(kind == NodeType.OUTPUT, unit + MAX_IO_UNIT + 1, unit)
        io_emb = torch.where(((kind == NodeType.INPUT) | (kind == NodeType.OUTPUT))[:, None],
                             self.io_unit(io), 0.0)
        dtype = self.node_values.weight.dtype
        h = (self.node_type(kind) + self.node_op(batch.node_op) + self.node_act(batch.node_act)
             + self.node_layer(batch.node_layer.clamp(max=MAX_LAYER)) + io_emb)
        e = self.edge_type(batch.edge_type)
        if self.value_norm:
            read = normalised_values(batch, exact(edge_attr), exact(x))
            edge_attr, x = read.edge, read.x
            h = h + self.node_scales(read.node_features.to(dtype))
            e = e + self.edge_scales(read.edge_features.to(dtype))
        h = h + self.node_values(x.to(dtype))
        e = e + self.edge_values(pad_kernels(edge_attr, self.kernel_width).to(dtype))
        return h, e

    def layer(self, index: int, batch, h: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self.layers[index](h, e, batch.edge_index)

    def readout(self, batch, h: Tensor, e: Tensor) -> Tensor:
        """Mean and max of node states, mean of weight-edge states and of output nodes'
        states, per graph, through an MLP."""
        node_graph, num_graphs = graph_ids(batch)
        weight, out = readout_nodes(batch)
        edge_graph = node_graph[batch.edge_index[1, weight]]
        h, e = exact(h), exact(e)  # long sums: not in half precision
        pooled = torch.cat([
            scatter(h, node_graph, 0, dim_size=num_graphs, reduce="mean"),
            scatter(h, node_graph, 0, dim_size=num_graphs, reduce="max"),
            scatter(e[weight], edge_graph, 0, dim_size=num_graphs, reduce="mean"),
            scatter(h[out], node_graph[out], 0, dim_size=num_graphs, reduce="mean"),
        ], dim=-1)
        return self.pool(pooled)

    def edit(self, batch, h: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self.edit_edges(e), self.edit_nodes(h)[:, 0]
