r"""The α-map: a learned, input-dependent group element.

"Quasi-Equivariant Metanetworks" build ``F(θ) = α(θ)·β(θ)``: ``β`` equivariant, ``α``
any map into the symmetry group. Here ``α(θ)`` is made of

* a positive scale per hidden unit that sits before a positively homogeneous
  activation (``symmetry.scalable_nodes``; every other node gets 1):
  ``s_j = 1 + ε_s · sin(γ_s(z_j))``;
* per attention head, GL factors ``M = I + ε_M · sin(Γ_M)/d_head`` and
  ``N = I + ε_N · sin(Γ_N)/d_head``, where ``Γ[a, b] = γ(z_a, z_b)`` is computed for
  every pair of positions ``(a, b)`` of the head, so heads of any width get factors.

``ε ∈ [ε_min, ε_max] ⊂ [0, 1)``, one per output kind, is learned (``"learned"``), pinned at
``eps_init`` (``"fixed"``) or 0 (``"frozen"``). With ``ε < 1`` α is always a valid group
element: every scale lies in ``(0, 2)``, and ``‖M − I‖₂ ≤ ‖M − I‖_F ≤ ε < 1``, so ``M``
and ``N`` are invertible.

``z`` is the input of ``γ`` (a two-layer MLP of hidden width 32): the statistics of the
network's weight and bias tensors (mean, variance, quantiles; see
:func:`~neuralgraph_quasi.nn.tensor_statistics`) pooled for the unit's layer and for
the whole network, the unit's state in the backbone, and that state standardised over
the unit's peers (same graph, layer and node type), so that units of one layer get
scales that differ by order one. Statistics are invariant to permutations and states
are equivariant, so ``α`` is permutation-equivariant and a prediction keeps its
permutation invariance. Where α acts is :class:`~neuralgraph_quasi.nn.QuasiGNN`'s
choice (``alpha_on``); ``docs/quasi.md`` argues the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from ..graph._schema import NodeType
from ..symmetry import GroupElement, scalable_nodes
from ..symmetry._act import gl_transform
from ..symmetry._index import head_rows
from ..symmetry._memo import structural
from ._backbone import weight_edge_mask
from ._mpnn import exact, graph_ids, mlp, no_autocast
from ._stats import NUM_STATS, TensorStatistics, squash, tensor_statistics

__all__ = ["AlphaMap", "Alpha", "statistics_per_node", "STAT_FEATURES"]

#: Width of the statistics part of γ's input: layer weights, layer node values, network.
STAT_FEATURES = 3 * NUM_STATS


def statistics_per_node(batch, exclude: Tensor | None = None,
                        stats: TensorStatistics | None = None) -> Tensor:
    """``[|V|, 21]`` statistics seen by each node: its layer's weight tensors, its layer's
    node-held tensors (biases, norm parameters), and all tensors of its network.

    Each part is the mean over tensors of their 7 statistics (signed-log squashed);
    parts with no tensor are zero. Segment operations only.

    Args:
        exclude: optional ``[P]`` boolean mask over parameter ids to leave out
            (e.g. attention projections, for a GL-invariant α).
        stats: :func:`tensor_statistics` of ``batch``, when already computed.
    """
    st = tensor_statistics(batch) if stats is None else stats
    stats = squash(st.stats)
    node_graph, num_graphs = graph_ids(batch)
    depth = structural(batch, "depth", lambda: int(batch.node_layer.max()) + 1)
    cells = num_graphs * depth
    # One scatter for both parts (cell, on_nodes), instead of boolean masks (which wait for
    # the device); excluded tensors go to a last, dropped row.
    part = (st.graph * depth + st.layer) * 2 + st.on_nodes.long()
    graph = st.graph
    if exclude is not None:
        drop = exclude[st.param]
        part = torch.where(drop, 2 * cells, part)
        graph = torch.where(drop, num_graphs, graph)
    table = scatter(stats, part, 0, dim_size=2 * cells + 1, reduce="mean")[:2 * cells]
    table = table.view(cells, 2, stats.size(1))
    network = scatter(stats, graph, 0, dim_size=num_graphs + 1, reduce="mean")[:num_graphs]
    node_cell = node_graph * depth + batch.node_layer
    return torch.cat([table[node_cell, 0], table[node_cell, 1], network[node_graph]], dim=-1)


@dataclass(frozen=True)
class Alpha:
    """One α(θ) for a batch: the tensors that act on states, differentiable.

    Attributes:
        scale: ``[|V|]`` per-node multiplier (1 outside ``scalable_nodes``).
        head_row: ``[|V|]`` row of ``M``/``N`` of each Q/K/V coordinate's head, -1 elsewhere.
        heads: ``[H]`` head node ids, in row order.
        M, N: ``[H, D, D]`` GL factors (identity past each head's width).
    """

    scale: Tensor
    head_row: Tensor
    heads: Tensor
    M: Tensor
    N: Tensor

    def act(self, batch, h: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Act on node states ``h`` like on biases and on edge states ``e`` like on weights
        (GL factors first, then scales, as :func:`~neuralgraph_quasi.symmetry.act`)."""
        if self.heads.numel():
            e, h = gl_transform(batch, self.head_row, self.M.to(e.dtype), self.N.to(e.dtype),
                                e, h)
        src, dst = batch.edge_index
        scale = self.scale.to(e.dtype)
        ratio = torch.where(weight_edge_mask(batch), scale[dst] / scale[src], 1.0)
        return h * scale[:, None].to(h.dtype), e * ratio[:, None]

    def element(self) -> GroupElement:
        """The same α as a :class:`~neuralgraph_quasi.symmetry.GroupElement` (float64,
        detached), to act on graphs and models with ``symmetry.act``."""
        n = self.scale.numel()
        return GroupElement(torch.arange(n), self.scale.detach().double().cpu(),
                            self.heads.cpu(), self.M.detach().double().cpu(),
                            self.N.detach().double().cpu())


def _spread(first: list[nn.Linear], out: nn.Linear, gain: float) -> None:
    """Initialise ``γ`` so that its output spreads by order ``gain`` radians across units:
    He-normal first layers (PyTorch's default would shrink standardised inputs about
    threefold), and an output layer of standard deviation ``gain / sqrt(fan_in)``."""
    for layer in first:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.normal_(out.weight, std=gain / math.sqrt(out.in_features))
    nn.init.zeros_(out.bias)


class _PairGamma(nn.Module):
    """``γ(z_a, z_b)`` for all position pairs of every head, by broadcasting; inputs
    standardised (LayerNorm without affine parameters)."""

    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm_z = nn.LayerNorm(state_dim, elementwise_affine=False)
        self.norm_context = nn.LayerNorm(STAT_FEATURES + 2 * state_dim,
                                         elementwise_affine=False)
        self.first = nn.Linear(state_dim, hidden)
        self.second = nn.Linear(state_dim, hidden, bias=False)
        self.context = nn.Linear(STAT_FEATURES + 2 * state_dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, z: Tensor, context: Tensor) -> Tensor:
        """``z [H, D, S]`` per position, ``context [H, C]`` per head → ``[H, D, D]``."""
        z, context = self.norm_z(z), self.norm_context(context)
        hidden = (self.first(z)[:, :, None] + self.second(z)[:, None, :]
                  + self.context(context)[:, None, None])
        return self.out(torch.nn.functional.silu(hidden))[..., 0]


class AlphaMap(nn.Module):
    r"""Compute ``α(θ)`` for a batch from weight statistics and backbone states.

    See the module docstring for the construction. Modes: ``"learned"`` (``ε`` and ``γ``
    trained), ``"fixed"`` (``ε`` pinned at ``eps_init``, ``γ`` trained) and ``"frozen"``
    (``ε = 0``: α is exactly the identity; the ablation with the same parameters and seeds).

    ``ε`` lives in ``[eps_min, eps_max]`` through a sigmoid, ``ε = ε_min + (ε_max − ε_min)
    · σ(ρ)``: with ``ε_max < 1`` α is always a valid group element, and the floor
    ``ε_min > 0`` removes the saddle of the product ``ε·sin γ`` at ``ε = 0`` (where ``γ``
    would get no gradient, and a shrinking ``ε`` would starve it further). A negative ``ε``
    is not needed: ``−sin γ = sin(γ + π)``.

    ``γ``'s input is standardised (a LayerNorm without affine parameters) and its output
    layer is initialised so that ``γ`` spreads over about ``±γ_gain`` radians at
    initialisation: ``sin γ`` then varies by order one across units, and only ``ε`` keeps α
    near the identity.

    Args:
        state_dim: width of the backbone's node states.
        gamma_hidden: hidden width of each γ (32, the paper's best).
        eps_init: initial ``ε`` for every output kind.
        frozen: keep α at the identity (same as ``mode="frozen"``).
        gl: produce GL factors for attention heads (else ``M = N = I``).
        mode: ``"learned"``, ``"fixed"`` or ``"frozen"``.
        eps_min, eps_max: bounds of a learned ``ε`` (``0 <= eps_min < eps_max < 1``).
        gamma_gain: standard deviation of ``γ``'s output at initialisation, in radians.
    """

    #: Output kinds, each with its own ε.
    KINDS = ("scale", "qk", "vo")
    #: Modes of ε.
    MODES = ("learned", "fixed", "frozen")

    def __init__(self, state_dim: int, gamma_hidden: int = 32, eps_init: float = 0.1,
                 frozen: bool = False, gl: bool = True, mode: str | None = None,
                 eps_min: float = 0.0, eps_max: float = 0.95, gamma_gain: float = 3.0) -> None:
        super().__init__()
        mode = ("frozen" if frozen else "learned") if mode is None else mode
        if mode not in self.MODES:
            raise ValueError(f"alpha must be one of {self.MODES}, got {mode!r}")
        if not 0.0 <= eps_min < eps_max < 1.0:
            raise ValueError(f"need 0 <= eps_min < eps_max < 1 so that α stays a group element, "
                             f"got eps_min={eps_min}, eps_max={eps_max}")
        if mode == "learned" and not eps_min < eps_init < eps_max:
            raise ValueError(f"eps_init must lie in (eps_min, eps_max) = ({eps_min}, {eps_max}) "
                             f"for a learned ε, got {eps_init}")
        if not 0.0 <= eps_init < 1.0:
            raise ValueError(f"eps_init must lie in [0, 1) so that α stays a group element, "
                             f"got {eps_init}")
        self.mode, self.gl = mode, gl
        self.frozen = mode == "frozen"
        self.eps_min, self.eps_max, self.eps_init = eps_min, eps_max, eps_init
        width = STAT_FEATURES + 2 * state_dim
        self.gamma_scale = nn.Sequential(nn.LayerNorm(width, elementwise_affine=False),
                                         mlp(width, gamma_hidden, 1))
        self.gamma_qk = _PairGamma(state_dim, gamma_hidden)
        self.gamma_vo = _PairGamma(state_dim, gamma_hidden)
        _spread([self.gamma_scale[1][0]], self.gamma_scale[1][2], gamma_gain)
        for pair in (self.gamma_qk, self.gamma_vo):
            _spread([pair.first, pair.second, pair.context], pair.out, gamma_gain)
        if mode == "learned":
            p = (eps_init - eps_min) / (eps_max - eps_min)
            rho = math.log(p / (1 - p))
        else:
            rho = 0.0
        self.rho = nn.Parameter(torch.full((3,), rho), requires_grad=mode == "learned")

    @property
    def eps(self) -> Tensor:
        """``[3]`` ε for scales, Q/K factors and V/O factors, each in ``[0, 1)``."""
        if self.frozen:
            return torch.zeros_like(self.rho)
        if self.mode == "fixed":
            return torch.full_like(self.rho, self.eps_init)
        return self.eps_min + (self.eps_max - self.eps_min) * torch.sigmoid(self.rho)

    def forward(self, batch, h: Tensor, stats: Tensor | None = None) -> Alpha:
        """α for ``batch``, given node states ``h [|V|, S]`` (and optionally the
        precomputed :func:`statistics_per_node`).

        α is computed in at least float32 with autocast off (``h`` may be bfloat16 under
        autocast: scales ``1 + ε·sin(·)`` with a small ``ε`` would round to 1 in bfloat16,
        and the standardisation over peers would amplify rounding).
        """
        with no_autocast(h.device.type):
            return self._forward(batch, exact(h), stats)

    def _forward(self, batch, h: Tensor, stats: Tensor | None) -> Alpha:
        stats = statistics_per_node(batch) if stats is None else stats
        dtype = h.dtype
        stats = stats.to(dtype)
        eps = self.eps.to(dtype)
        plan = structural(batch, "alpha", lambda: _alpha_plan(batch))
        peers = _within_layer(plan.cell, plan.num_cells, h)
        z = torch.cat([stats, h, peers], dim=-1)
        raw = torch.sin(self.gamma_scale(z)[:, 0].to(dtype))
        scale = torch.where(plan.scalable, 1 + eps[0] * raw, torch.ones_like(raw))
        if plan.heads.numel() == 0:
            empty = h.new_zeros(0, 0, 0, dtype=dtype)
            return Alpha(scale, plan.head_row, plan.heads, empty, empty)
        M, N = self._gl_factors(plan, peers, z, eps)
        return Alpha(scale, plan.head_row, plan.heads, M, N)

    def _gl_factors(self, plan: _AlphaPlan, h, z, eps) -> tuple[Tensor, Tensor]:
        """``M, N [H, D, D]`` from each position's state relative to its peers (``h``) and
        the head's context (its row of ``z``)."""
        num_heads, width, dtype = plan.heads.numel(), plan.width, eps.dtype
        size = plan.size.to(dtype)
        valid = torch.arange(width, device=h.device)[None] < plan.size[:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(width, dtype=dtype, device=h.device).expand(num_heads, width, width)
        context = z[plan.heads]
        factors = []
        for gamma, members, k in ((self.gamma_qk, plan.qk, 1), (self.gamma_vo, plan.v, 2)):
            if not self.gl:
                factors.append(eye)
                continue
            per_position = h.new_zeros(num_heads, width, h.size(1))
            for nodes, rows, pos in members:
                per_position = per_position.index_put((rows, pos), h[nodes], accumulate=True)
            noise = torch.where(pair, torch.sin(gamma(per_position, context).to(dtype)), 0.0)
            factors.append(eye + eps[k] * noise / size[:, None, None])
        return factors[0], factors[1]


def _within_layer(cell: Tensor, num_cells: int, h: Tensor) -> Tensor:
    """``h`` standardised over the units of each cell (graph, layer, node type): how a unit
    differs from its peers, at order one whatever the layer's common part. A unit alone
    in its cell gets 0. Permutation-equivariant (a cell is a set of units)."""
    wide = exact(h)  # small differences between peers: not in half precision
    mean = scatter(wide, cell, 0, dim_size=num_cells, reduce="mean")
    centred = wide - mean[cell]
    var = scatter(centred * centred, cell, 0, dim_size=num_cells, reduce="mean")
    # a floor relative to the cell's mean square: peers that differ by a few percent are
    # told apart at order one, while round-off between near-identical peers is not blown up
    floor = 1e-6 + 1e-2 * scatter(wide * wide, cell, 0, dim_size=num_cells, reduce="mean")
    return (centred * torch.rsqrt(var + floor)[cell]).to(h.dtype)


@dataclass(frozen=True)
class _AlphaPlan:
    """Structure-only inputs of α (memoised per batch structure): scalable nodes, head
    nodes and rows, the widest head, each head's width, and the Q, K (``qk``) and V (``v``)
    coordinates as ``(nodes, head rows, positions)``."""

    scalable: Tensor
    cell: Tensor
    num_cells: int
    heads: Tensor
    head_row: Tensor
    width: int
    size: Tensor
    qk: tuple[tuple[Tensor, Tensor, Tensor], ...]
    v: tuple[tuple[Tensor, Tensor, Tensor], ...]


def _alpha_plan(batch) -> _AlphaPlan:
    heads = (batch.node_type == NodeType.HEAD).nonzero().view(-1)
    head_row = head_rows(batch, heads)
    scalable = scalable_nodes(batch)
    node_graph, _ = graph_ids(batch)
    key = (node_graph * (int(batch.node_layer.max()) + 1) + batch.node_layer) \
        * (int(batch.node_type.max()) + 1) + batch.node_type
    _, cell = torch.unique(key, return_inverse=True)
    num_cells = int(cell.max()) + 1 if cell.numel() else 0
    if heads.numel() == 0:
        return _AlphaPlan(scalable, cell, num_cells, heads, head_row, 0, heads, (), ())
    coord = (head_row >= 0).nonzero().view(-1)
    pos = batch.node_pos[coord]
    width = int(pos.max()) + 1
    size = torch.zeros(heads.numel(), dtype=pos.dtype, device=pos.device).scatter_reduce(
        0, head_row[coord], pos + 1, reduce="amax")

    def members(*types):
        out = []
        for t in types:
            nodes = (batch.node_type == t).nonzero().view(-1)
            out.append((nodes, head_row[nodes], batch.node_pos[nodes]))
        return tuple(out)

    return _AlphaPlan(scalable, cell, num_cells, heads, head_row, width, size,
                      members(NodeType.QUERY, NodeType.KEY), members(NodeType.VALUE))

