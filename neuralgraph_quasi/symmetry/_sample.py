"""Sampling group elements, and which units each kind of symmetry may touch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..graph._schema import Act, EdgeType, NodeOp, NodeType, Slot
from ._element import GroupElement
from ._index import encode, find, graph_of_nodes, head_of_nodes

__all__ = ["KINDS", "sample", "identity", "scalable_nodes", "sign_flippable_nodes",
           "GL_CONDITION"]

#: The kinds of symmetry :func:`sample` knows.
KINDS = ("permutation", "scale", "sign", "head_permutation", "gl")

#: Bound on the condition number of sampled GL factors.
GL_CONDITION = 4.0

_POSITIVELY_HOMOGENEOUS = (Act.RELU, Act.LEAKY_RELU, Act.IDENTITY)
_ODD = (Act.TANH, Act.SINE, Act.IDENTITY)
# Consumers through which a per-unit multiplier can be undone by the next weights.
_LINEAR_CONSUMERS = (EdgeType.LINEAR, EdgeType.CONV, EdgeType.ATTN_Q, EdgeType.ATTN_K,
                     EdgeType.ATTN_V)
# Ops whose output unit absorbs a multiplier in its incoming weights and bias.
_WEIGHTED_OPS = (NodeOp.LINEAR, NodeOp.CONV, NodeOp.EMBEDDING, NodeOp.ATTENTION_OUT)
# Normalisations absorb it in their gain and shift when affine: scaling a norm's *output*
# is exact, scaling its input is not (eps).
_NORM_OPS = (NodeOp.BATCH_NORM, NodeOp.LAYER_NORM)


def _codes(values, device) -> Tensor:
    return torch.tensor([int(v) for v in values], device=device)


def _multipliable(graph) -> Tensor:
    """Hidden units with incoming weights whose every consumer is a weighted linear map."""
    dev = graph.x.device
    src, dst = graph.edge_index
    bad = torch.zeros(graph.num_nodes, dtype=torch.bool, device=dev)
    bad[src[~torch.isin(graph.edge_type, _codes(_LINEAR_CONSUMERS, dev))]] = True
    bad[dst[graph.edge_type == EdgeType.RESIDUAL]] = True
    weighted = torch.isin(graph.node_op, _codes(_WEIGHTED_OPS, dev))
    affine_norm = (torch.isin(graph.node_op, _codes(_NORM_OPS, dev))
                   & (graph.node_param[:, Slot.GAIN] >= 0))
    return (graph.node_type == NodeType.HIDDEN) & (weighted | affine_norm) & ~bad


def scalable_nodes(graph) -> Tensor:
    """``[N]`` mask of units a positive scaling may act on.

    Hidden units followed by a positively homogeneous activation (ReLU,
    LeakyReLU, none) whose outputs feed only weighted linear maps, and that
    absorb the scale in their incoming weights and bias or, for an affine
    BatchNorm/LayerNorm output, in its gain and shift. Units feeding a
    normalisation are excluded: rescaling before it is exact only up to its
    ``eps``. Units on a residual stream are excluded.
    """
    return _multipliable(graph) & torch.isin(graph.node_act, _codes(_POSITIVELY_HOMOGENEOUS,
                                                                     graph.x.device))


def sign_flippable_nodes(graph) -> Tensor:
    """``[N]`` mask of units a sign flip may act on (odd activations: tanh, sine, none)."""
    return _multipliable(graph) & torch.isin(graph.node_act, _codes(_ODD, graph.x.device))


def _shuffle_within(groups: Tensor, units: Tensor, generator) -> Tensor:
    """For items ``(group, unit)`` (unique pairs): each item's new unit under a uniformly
    random permutation of the units of its group."""
    if groups.numel() == 0:
        return units
    noise = torch.rand(groups.numel(), generator=generator, dtype=torch.float64)
    by_noise = torch.argsort(groups.double() * 2 + noise)
    by_unit = torch.argsort(encode(groups, units))
    new = torch.empty_like(units)
    new[by_unit] = units[by_noise]
    return new


def _permute_units(graph, gid: Tensor, perm: Tensor, generator) -> None:
    nodes = (graph.node_perm >= 0).nonzero().view(-1)
    if nodes.numel() == 0:
        return
    cls = encode(gid[nodes], graph.node_perm[nodes])
    unit = graph.node_unit[nodes]
    pairs, inv = torch.unique(torch.stack([cls, unit]), dim=1, return_inverse=True)
    new_unit = _shuffle_within(pairs[0], pairs[1], generator)[inv]
    layer = graph.node_layer[nodes]
    perm[nodes] = nodes[find([cls, layer, unit], [cls, layer, new_unit])]


def _permute_heads(graph, gid: Tensor, perm: Tensor, generator) -> None:
    heads = (graph.node_type == NodeType.HEAD).nonzero().view(-1)
    if heads.numel() == 0:
        return
    layer_of_head = encode(gid[heads], graph.node_layer[heads])
    new_head = _shuffle_within(layer_of_head, graph.node_head[heads], generator)
    target = torch.full((graph.num_nodes,), -1, dtype=torch.long)
    target[heads] = new_head
    nodes = (graph.node_head >= 0).nonzero().view(-1)  # head nodes and their Q/K/V members
    owner = head_of_nodes(graph)
    owner[heads] = heads
    new = target[owner[nodes]]
    fixed = [gid[nodes], graph.node_layer[nodes], graph.node_type[nodes], graph.node_pos[nodes]]
    perm[nodes] = nodes[find([*fixed, graph.node_head[nodes]], [*fixed, new])]


def _head_widths(graph, heads: Tensor) -> Tensor:
    owner = head_of_nodes(graph)
    q = (graph.node_type == NodeType.QUERY).nonzero().view(-1)
    width = torch.zeros(graph.num_nodes, dtype=torch.long)
    width.scatter_reduce_(0, owner[q], graph.node_pos[q] + 1, reduce="amax")
    return width[heads]


def _random_gl(width: int, count: int, generator, condition: float) -> Tensor:
    """``count`` matrices ``P U diag(s) Vᵀ`` with Haar ``U``, ``V``, a random position
    permutation ``P`` and singular values in ``[κ^-1/2, κ^1/2]`` (condition ≤ κ)."""
    def haar() -> Tensor:
        q, r = torch.linalg.qr(torch.randn(count, width, width, generator=generator,
                                           dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]

    half = math.log(condition) / 2
    s = torch.exp((torch.rand(count, width, generator=generator, dtype=torch.float64) * 2 - 1)
                  * half)
    perm = torch.argsort(torch.rand(count, width, generator=generator), dim=-1)
    P = torch.eye(width, dtype=torch.float64)[perm]
    return P @ haar() @ torch.diag_embed(s) @ haar().mT


def identity(graph) -> GroupElement:
    """The identity element of ``graph``'s (or a batch's) symmetry group."""
    heads = (graph.node_type == NodeType.HEAD).nonzero().view(-1).cpu()
    width = int(_head_widths(graph.cpu(), heads).max()) if heads.numel() else 0
    return GroupElement.identity(graph.num_nodes, heads, width).to(graph.x.device)


def sample(graph, generator: torch.Generator | None = None, kinds=None,
           scale_range: tuple[float, float] = (1.0, 10.0),
           gl_condition: float = GL_CONDITION) -> GroupElement:
    """Draw a random element of the largest symmetry group known for ``graph``.

    Args:
        graph: a :class:`~neuralgraph_quasi.NeuralGraph` or a batch of them
            (one element with an independent factor per graph).
        generator: a CPU :class:`torch.Generator` for reproducibility.
        kinds: subset of ``{"permutation", "scale", "sign", "head_permutation",
            "gl"}``; ``None`` takes every kind. Kinds that do not apply to a
            graph leave it alone, so one list serves mixed batches.
        scale_range: positive scales are drawn log-uniformly in this range
            (ranges below 1 are allowed).
        gl_condition: bound ``κ`` on the condition number of each GL factor
            (singular values log-uniform in ``[κ^-1/2, κ^1/2]``, times a
            random permutation of the positions inside the head).

    Returns:
        a :class:`GroupElement`; apply it with :func:`act`.
    """
    kinds = set(KINDS if kinds is None else kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown symmetry kinds {sorted(unknown)}; known: {list(KINDS)}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    device = graph.x.device
    graph = graph.cpu()
    element = identity(graph)
    gid = graph_of_nodes(graph)
    perm, scale = element.perm.clone(), element.scale.clone()
    if "permutation" in kinds:
        _permute_units(graph, gid, perm, generator)
    if "head_permutation" in kinds:
        _permute_heads(graph, gid, perm, generator)
    if "scale" in kinds:
        mask = scalable_nodes(graph)
        u = torch.rand(int(mask.sum()), generator=generator, dtype=torch.float64)
        scale[mask] = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    if "sign" in kinds:
        mask = sign_flippable_nodes(graph)
        flip = torch.randint(0, 2, (int(mask.sum()),), generator=generator)
        scale[mask] = scale[mask] * (1 - 2 * flip).double()
    M, N = element.M.clone(), element.N.clone()
    if "gl" in kinds and element.heads.numel():
        widths = _head_widths(graph, element.heads)
        for w in torch.unique(widths).tolist():
            rows = (widths == w).nonzero().view(-1)
            M[rows, :w, :w] = _random_gl(w, rows.numel(), generator, gl_condition)
            N[rows, :w, :w] = _random_gl(w, rows.numel(), generator, gl_condition)
    return GroupElement(perm, scale, element.heads, M, N).to(device)
