"""ScaleMPNN: a message-passing backbone equivariant to positive scalings of hidden units.

Learnt from ScaleGMN (Kalogeropoulos et al., NeurIPS 2024): states that transform like
the weights, bias-free linear maps, and nonlinearities only as *invariant gates* computed
from canonicalised (unit-norm) inputs. Unlike ScaleGMN, messages against the edge
direction are equivariant too (ScaleGMN reuses the forward edge features backwards, which
is not), and nothing takes a reciprocal of a state (which overflows float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from ..graph._schema import NUM_SLOTS, Act, EdgeType, NodeOp, NodeType, Slot
from ..symmetry import scalable_nodes
from ..symmetry._memo import structural
from ._backbone import Backbone, kernel_values, weight_edge_mask
from ._mpnn import aggregate_exact, exact, readout_nodes

__all__ = ["ScaleMPNN", "ScaleMPNNLayer", "ScaleMessages", "canon", "TINY"]

#: Added to ``‖v‖²`` in :func:`canon`. ``canon(λv)`` differs from ``canon(v)`` by a
#: relative ``≈ TINY / (2‖v‖²)``, so states down to ``‖v‖ ≈ 1e-7`` (a weight of 1e-3
#: between units scaled by 1e-2 and 1e2) stay invariant to 1e-10 in float64. In float32
#: ``TINY`` is a normal number (> 1.2e-38), a zero row maps to zero, and the Jacobian is
#: bounded by ``TINY^-1/2 = 1e12``: finite, no NaN. Overflow of ``‖v‖²`` needs
#: ``‖v‖ > 1e19``, far above what degree-1 states reach (see :class:`ScaleMPNN`).
TINY = 1e-24

# ScaleMPNN.encode and QuasiGNN read these pairs of slots as slices
assert Slot.GAIN == Slot.BIAS + 1 and Slot.RUNNING_VAR == Slot.RUNNING_MEAN + 1


def canon(v: Tensor) -> Tensor:
    """Row-wise ``v / sqrt(‖v‖² + TINY)``: invariant to positive row scalings."""
    return v * torch.rsqrt(v.square().sum(-1, keepdim=True) + TINY)


def _rms(v: Tensor) -> Tensor:
    """Row-wise root mean square, computed as ``‖v‖² / sqrt(‖v‖² + TINY) / sqrt(H)``:
    positively homogeneous of degree 1, zero with zero gradient at ``v = 0``."""
    sq = v.square().sum(-1, keepdim=True)
    return sq * torch.rsqrt(sq + TINY) / v.size(-1) ** 0.5


def _invariant(v: Tensor, free: Tensor) -> Tensor:
    """``[canon(v), free · v / sqrt(1 + mean(v²))]``: invariant views of a homogeneous state.

    The second half is the (softly bounded) raw state, only where ``free``, i.e. where no
    scaling ever acts. Bounding it keeps the gates bounded: a gate that grew with the state
    it multiplies would make magnitudes compound from layer to layer.
    """
    soft = v * torch.rsqrt(1 + v.square().mean(-1, keepdim=True))
    return torch.cat([canon(v), free * soft], dim=-1)


class ScaleMessages(MessagePassing):
    r"""Messages along the edges in one direction, homogeneous in the receiver's scale.

    For an edge from sender :math:`s` to receiver :math:`r` (``edge_index[0] → [1]``):

    .. math::
        g &= \mathrm{MLP}\big(L_s[\hat h_s] + L_r[\hat h_r] + L_e[\hat e_{sr}]
             + t_{sr}\big) = (g^t, g^r, g^n, g^x) \\
        m_{s \to r} &= [\text{transport}]\,[\text{weight}]\,(A e_{sr}) \odot (B h_s)
            \odot g^t + (C h_r) \odot g^r + \mathrm{rms}(h_r)\, g^n
            + [r\ \text{fixed}]\, g^x

    where :math:`[\hat v] = [\mathrm{canon}(v), [\text{fixed}]\, v/\sqrt{1 + \overline{v^2}}]`
    is invariant (raw states only where no scaling acts, softly bounded). With
    ``transport`` (the forward direction of weight edges, :math:`e_{sr}` scaling as
    :math:`d_r/d_s`) the first term scales as :math:`d_r`; the others scale as
    :math:`d_r` whatever the edge. The messages are aggregated with every aggregator
    (all messages to :math:`r` share the factor :math:`d_r > 0`, so ``max``/``min`` are
    equivariant too) and concatenated.

    Args:
        hidden_dim: ``H``.
        aggregators: PyG aggregations, e.g. ``("mean", "sum")``.
        transport: whether to send ``(A e) ⊙ (B h_s)`` on weight edges. Only correct when
            ``e_sr`` scales as ``d_r / d_s``: in the edge direction, never against it.

    Shapes:
        input: ``h [|V|, H]``, ``e [|E|, H]``, ``edge_index [2, |E|]``;
        output ``[|V|, len(aggregators) * H]``.
    """

    def __init__(self, hidden_dim: int, aggregators: Sequence[str] = ("mean", "sum"),
                 transport: bool = True) -> None:
        super().__init__(aggr=list(aggregators))
        H = hidden_dim
        self.hidden_dim, self.transport = H, transport
        self.lin_send = nn.Linear(2 * H, H, bias=False)
        self.lin_recv = nn.Linear(2 * H, H, bias=False)
        self.lin_edge = nn.Linear(2 * H, H, bias=False)
        self.lin_type = nn.Linear(H, H)
        self.gate = nn.Linear(H, (4 if transport else 3) * H)
        self.lin_A = nn.Linear(H, H, bias=False)
        self.lin_B = nn.Linear(H, H, bias=False)
        self.lin_C = nn.Linear(H, H, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.lin_send, self.lin_recv, self.lin_edge, self.lin_type, self.gate,
                    self.lin_A, self.lin_B, self.lin_C):
            lin.reset_parameters()

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor, edge_ctx: Tensor,
                fixed: Tensor, free: Tensor, weight: Tensor) -> Tensor:
        hat_h = _invariant(h, fixed)
        ge = self.lin_edge(_invariant(e, free)) + self.lin_type(edge_ctx)
        return self.propagate(edge_index, h=h, hb=self.lin_B(h), gs=self.lin_send(hat_h),
                              gr=self.lin_recv(hat_h), ge=ge, e=e, fixed=fixed, weight=weight,
                              size=(h.size(0), h.size(0)))

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Tensor | None = None,
                  dim_size: int | None = None) -> Tensor:
        return aggregate_exact(self, inputs, index, ptr, dim_size)

    def message(self, h_i: Tensor, hb_j: Tensor, gs_j: Tensor, gr_i: Tensor, ge: Tensor,
                e: Tensor, fixed_i: Tensor, weight: Tensor) -> Tensor:
        g = self.gate(F.silu(gs_j + gr_i + ge)).chunk(4 if self.transport else 3, dim=-1)
        out = self.lin_C(h_i) * g[0] + _rms(h_i) * g[1] + fixed_i * g[2]
        if self.transport:
            out = out + weight * self.lin_A(e) * hb_j * g[3]
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.hidden_dim}, aggr={self.aggr}, "
                f"transport={self.transport})")


class ScaleMPNNLayer(MessagePassing):
    r"""One layer of :class:`ScaleMPNN`: messages both ways, then node and edge updates.

    .. math::
        u_j &= D h_j + P_f \big\Vert_{a} \mathrm{agg}^a_{i \to j} m^f_{i \to j}
              + P_b \big\Vert_{a} \mathrm{agg}^a_{k \leftarrow j} m^b_{k \to j} \\
        (\psi_j, \rho_j) &= \mathrm{MLP}(L_u[\hat u_j] + L_h[\hat h_j] + L_t t_j), \quad
        h'_j = h_j + u_j \odot \psi_j + [j\ \text{fixed}]\, \rho_j \\
        (\chi_{ij}, \sigma_{ij}) &= \mathrm{MLP}(L_s[\hat h'_i] + L_r[\hat h'_j]
              + L_e[\hat e_{ij}] + L_t t_{ij}), \quad
        e'_{ij} = e_{ij} + [\text{weight}]\,(E e_{ij}) \odot \chi_{ij}
              + [ij\ \text{free}]\, \sigma_{ij}

    :math:`m^f` is :class:`ScaleMessages` with transport along the edges, :math:`m^b` the
    same without transport against them. ``D``, ``P``, ``E`` are bias-free; ``t`` are
    type embeddings; :math:`[\hat v]` is the invariant view (``canon``, plus the raw
    state where no scaling acts). ``u_j`` scales as :math:`d_j`, the gates are invariant,
    so ``h'_j`` scales as :math:`d_j` and ``e'_{ij}`` as :math:`d_j/d_i`.

    Args:
        hidden_dim: ``H``.
        aggregators: PyG aggregations for both directions.

    Shapes:
        input: ``h [|V|, H]``, ``e [|E|, H]`` and the context of :meth:`ScaleMPNN.context`;
        output: ``(h' [|V|, H], e' [|E|, H])``.
    """

    def __init__(self, hidden_dim: int, aggregators: Sequence[str] = ("mean", "sum")) -> None:
        super().__init__()
        H, A = hidden_dim, len(aggregators)
        self.hidden_dim = H
        self.forward_messages = ScaleMessages(H, aggregators, transport=True)
        self.backward_messages = ScaleMessages(H, aggregators, transport=False)
        self.lin_self = nn.Linear(H, H, bias=False)
        self.lin_fwd = nn.Linear(A * H, H, bias=False)
        self.lin_bwd = nn.Linear(A * H, H, bias=False)
        self.node_u = nn.Linear(2 * H, H, bias=False)
        self.node_h = nn.Linear(2 * H, H, bias=False)
        self.node_type = nn.Linear(H, H)
        self.node_out = nn.Linear(H, 2 * H)
        self.edge_lin = nn.Linear(H, H, bias=False)
        self.edge_send = nn.Linear(2 * H, H, bias=False)
        self.edge_recv = nn.Linear(2 * H, H, bias=False)
        self.edge_self = nn.Linear(2 * H, H, bias=False)
        self.edge_type = nn.Linear(H, H)
        self.edge_out = nn.Linear(H, 2 * H)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for module in self.children():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, h: Tensor, e: Tensor, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        edge_index = ctx["edge_index"]
        common = dict(edge_ctx=ctx["edge_emb"], fixed=ctx["fixed"], free=ctx["free"],
                      weight=ctx["weight"])
        fwd = self.forward_messages(h, e, edge_index, **common)
        bwd = self.backward_messages(h, e, edge_index.flip(0), **common)
        u = self.lin_self(h) + self.lin_fwd(fwd) + self.lin_bwd(bwd)
        fixed = ctx["fixed"]
        pre = (self.node_u(_invariant(u, fixed)) + self.node_h(_invariant(h, fixed))
               + self.node_type(ctx["node_emb"]))
        psi, rho = self.node_out(F.silu(pre)).chunk(2, dim=-1)
        h = h + u * psi + fixed * rho
        hat_h = _invariant(h, fixed)
        e = self.edge_updater(edge_index, hs=self.edge_send(hat_h), hr=self.edge_recv(hat_h),
                              e=e, edge_ctx=ctx["edge_emb"], free=ctx["free"],
                              weight=ctx["weight"], size=(h.size(0), h.size(0)))
        return h, e

    def edge_update(self, hs_j: Tensor, hr_i: Tensor, e: Tensor, edge_ctx: Tensor,
                    free: Tensor, weight: Tensor) -> Tensor:
        pre = hs_j + hr_i + self.edge_self(_invariant(e, free)) + self.edge_type(edge_ctx)
        chi, sigma = self.edge_out(F.silu(pre)).chunk(2, dim=-1)
        return e + weight * self.edge_lin(e) * chi + free * sigma

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden_dim})"


class ScaleMPNN(Backbone):
    r"""A backbone equivariant to permutations, head permutations and positive scalings.

    States: ``h [|V|, H]`` per node, ``e [|E|, H]`` per edge. For a positive scaling
    ``d`` (1 outside :func:`~neuralgraph_quasi.symmetry.scalable_nodes`) every node state
    scales as :math:`h_j \to d_j h_j` and every weight-edge state as
    :math:`e_{ij} \to (d_j/d_i)\, e_{ij}`, exactly like biases and weights. Structural
    edges (``edge_param == -1``) carry invariant states (the scaling never acts on their
    source; the α-map of :class:`QuasiGNN` leaves them alone). "Fixed" nodes, which no
    scaling moves, and "free" edges (structural, or a weight edge between two fixed nodes)
    have invariant states and are updated by unconstrained MLPs.

    Encoding, with ``v = kernel_values`` and type embeddings ``t`` (of node type, op,
    activation and clamped layer; of edge type):

    .. math::
        h_j &= (W_x\, x_j^{\mathrm{bias,gain}}) \odot (M t_j + W_s x_j^{\mathrm{stats}})
              + [j\ \text{fixed}]\,(N t_j + W_f x_j) \\
        e_{ij} &= (W_e v_{ij}) \odot (M' t_{ij}) + [ij\ \text{free}]\, N' t_{ij}

    with ``W_x``, ``W_s``, ``W_e`` bias-free (BatchNorm running statistics are invariant),
    then ``num_layers`` :class:`ScaleMPNNLayer`\ s. Every nonlinearity is an invariant gate
    (a function of ``canon(v) = v / sqrt(‖v‖² + TINY)``, of embeddings, and of softly
    bounded raw states of fixed nodes and free edges) multiplying a term of degree one.

    Magnitudes: every state is homogeneous of degree exactly one in ``d`` (the forward
    message :math:`(A e_{ij}) \odot (B h_i)` has degree :math:`d_j/d_i \cdot d_i`), so a
    scaling multiplies a state by its own :math:`d_j` (or :math:`d_j/d_i`) and never by a
    product of scales along a path: with scales up to 1e4 the states are at most 1e4 times
    (edges between two scaled layers: 1e4 times or 1e-4 times) their unscaled size, at any
    depth. No reciprocal of a state is taken. The unscaled magnitudes follow the weights
    like a linear forward pass of the network (products of weights along paths of up to
    ``num_layers`` edges), which is bounded for trained networks.

    Trade-off: information travels *against* the edges only through invariant gates on
    the receiver's own state (:math:`(C h_i) \odot g`, :math:`\mathrm{rms}(h_i)\, g`):
    transporting :math:`h_j` backwards would need :math:`e_{ij}^{-1}` (ScaleGMN's bug
    reuses :math:`e_{ij}` instead, which is not equivariant; the reciprocal overflows
    float32 at the CNN zoo's 1e4 scalings). Magnitude information of a unit therefore
    flows forward only; directions (``canon``) flow both ways.

    Invariant readout (:meth:`readout`): mean and max over ``OUTPUT`` nodes of their
    states (outputs are never scaled), mean over nodes of ``canon(h)`` and over weight
    edges of ``canon(e)``, per graph. Edit (:meth:`edit`): bias-free linear maps of ``e``
    and ``h``, which transform like weights and biases.

    Args:
        hidden_dim: ``H``.
        num_layers: message-passing layers.
        kernel_width: width of the edge values (``kernel_values``) and of the edge edit.
        aggregators: PyG aggregations of the messages (``"mean"``, ``"sum"``, ``"max"``,
            ``"min"``; each is equivariant to positive scalings).
        max_layer: ``node_layer`` is clamped to ``[0, max_layer]`` before its embedding.

    Shapes:
        :meth:`encode`: a batch with ``|V|`` nodes and ``|E|`` edges →
        ``(h [|V|, H], e [|E|, H])``; :meth:`readout`: ``[B, 4H]``;
        :meth:`edit`: ``([|E|, kernel_width], [|V|])``.
    """

    equivariant_to = frozenset({"permutation", "head_permutation", "scale"})

    def __init__(self, hidden_dim: int = 64, num_layers: int = 4, kernel_width: int = 9,
                 aggregators: Sequence[str] = ("mean", "sum"), max_layer: int = 32) -> None:
        super().__init__(hidden_dim, num_layers, kernel_width)
        H = hidden_dim
        self.aggregators, self.max_layer = tuple(aggregators), max_layer
        self.emb_node_type = nn.Embedding(len(NodeType), H)
        self.emb_node_op = nn.Embedding(len(NodeOp), H)
        self.emb_node_act = nn.Embedding(len(Act), H)
        self.emb_node_layer = nn.Embedding(max_layer + 1, H)
        self.emb_edge_type = nn.Embedding(len(EdgeType), H)
        self.enc_x = nn.Linear(2, H, bias=False)
        self.enc_stats = nn.Linear(2, H, bias=False)
        self.enc_mult = nn.Linear(H, H)
        self.enc_fixed = nn.Linear(NUM_SLOTS, H, bias=False)
        self.enc_add = nn.Linear(H, H)
        self.enc_e = nn.Linear(kernel_width, H, bias=False)
        self.enc_emult = nn.Linear(H, H)
        self.enc_eadd = nn.Linear(H, H)
        self.layers = nn.ModuleList(ScaleMPNNLayer(H, self.aggregators)
                                    for _ in range(num_layers))
        self.edit_edge = nn.Linear(H, kernel_width, bias=False)
        self.edit_bias = nn.Linear(H, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.children():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    @property
    def readout_dim(self) -> int:
        return 4 * self.hidden_dim

    def context(self, batch) -> dict[str, Tensor]:
        """Invariant per-forward context: masks (as ``[*, 1]`` floats) and type embeddings.

        ``fixed``: nodes outside ``scalable_nodes``; ``weight``: edges with parameter
        values; ``free``: structural edges and weight edges between two fixed nodes.
        """
        dtype = self.enc_x.weight.dtype
        src, dst = batch.edge_index
        fixed = ~structural(batch, "scalable", lambda: scalable_nodes(batch))
        weight = weight_edge_mask(batch)
        free = ~weight | (fixed[src] & fixed[dst])
        layer = batch.node_layer.clamp(0, self.max_layer)
        node_emb = (self.emb_node_type(batch.node_type) + self.emb_node_op(batch.node_op)
                    + self.emb_node_act(batch.node_act) + self.emb_node_layer(layer))
        return {"edge_index": batch.edge_index, "fixed": fixed.to(dtype)[:, None],
                "weight": weight.to(dtype)[:, None], "free": free.to(dtype)[:, None],
                "node_emb": node_emb, "edge_emb": self.emb_edge_type(batch.edge_type)}

    def encode(self, batch, ctx: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        ctx = self.context(batch) if ctx is None else ctx
        x = batch.x.to(self.enc_x.weight.dtype)
        # slices, not lists of columns (a list is copied to the device, which waits for it)
        values, stats = x[:, Slot.BIAS:Slot.GAIN + 1], x[:, Slot.RUNNING_MEAN:Slot.RUNNING_VAR + 1]
        t = ctx["node_emb"]
        h = (self.enc_x(values) * (self.enc_mult(t) + self.enc_stats(stats))
             + ctx["fixed"] * (self.enc_add(t) + self.enc_fixed(x)))
        v = kernel_values(batch, self.kernel_width).to(x.dtype)
        te = ctx["edge_emb"]
        e = self.enc_e(v) * self.enc_emult(te) + ctx["free"] * self.enc_eadd(te)
        return h, e

    def layer(self, index: int, batch, h: Tensor, e: Tensor,
              ctx: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        ctx = self.context(batch) if ctx is None else ctx
        return self.layers[index](h, e, ctx)

    def forward(self, batch) -> tuple[Tensor, Tensor]:
        """``encode`` then every layer: the final ``(h, e)``."""
        ctx = self.context(batch)
        h, e = self.encode(batch, ctx)
        for index in range(self.num_layers):
            h, e = self.layer(index, batch, h, e, ctx)
        return h, e

    def readout(self, batch, h: Tensor, e: Tensor) -> Tensor:
        graph = getattr(batch, "batch", None)
        if graph is None:
            graph, count = torch.zeros(h.size(0), dtype=torch.long, device=h.device), 1
        else:
            count = int(batch.num_graphs)
        weight, out = readout_nodes(batch)
        edge_graph = graph[batch.edge_index[0, weight]]
        h, e = exact(h), exact(e)  # long sums: not in half precision
        return torch.cat([
            scatter(h[out], graph[out], 0, dim_size=count, reduce="mean"),
            scatter(h[out], graph[out], 0, dim_size=count, reduce="max"),
            scatter(canon(h), graph, 0, dim_size=count, reduce="mean"),
            scatter(canon(e[weight]), edge_graph, 0, dim_size=count, reduce="mean"),
        ], dim=-1)

    def edit(self, batch, h: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self.edit_edge(e), self.edit_bias(h)[:, 0]

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.hidden_dim}, num_layers={self.num_layers}, "
                f"kernel_width={self.kernel_width}, aggregators={self.aggregators})")
