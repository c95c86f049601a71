"""Graphs as pictures: export to networkx and draw with matplotlib."""

from __future__ import annotations

from pathlib import Path

import torch

from ._schema import WEIGHT_EDGE_TYPES, EdgeType, NodeType, Role

__all__ = ["to_networkx", "draw"]

_NODE_COLOURS = {
    NodeType.INPUT: "#4c72b0", NodeType.HIDDEN: "#8c8c8c", NodeType.OUTPUT: "#55a868",
    NodeType.QUERY: "#dd8452", NodeType.KEY: "#c44e52", NodeType.VALUE: "#8172b3",
    NodeType.HEAD: "#000000",
}
_ROLE_COLOURS = {Role.Q: "#dd8452", Role.K: "#c44e52", Role.V: "#8172b3", Role.O: "#937860"}


def to_networkx(graph):
    """A :class:`networkx.MultiDiGraph` with every node and edge attribute of ``graph``.

    Node ``n`` carries ``type``, ``op``, ``layer``, ``unit``, ``act``, ``head``,
    ``pos``, ``perm`` and its slot values ``x``; each edge carries ``type``,
    ``role``, ``head``, ``pos``, ``kshape`` and its value vector ``value``
    (trimmed to the kernel's true size).
    """
    import networkx as nx

    g = nx.MultiDiGraph()
    keys = ("type", "op", "layer", "unit", "act", "head", "pos", "perm")
    columns = [getattr(graph, f"node_{k}").tolist() for k in keys]
    xs = graph.x.tolist()
    for n in range(graph.num_nodes):
        g.add_node(n, **{k: c[n] for k, c in zip(keys, columns, strict=True)}, x=xs[n])
    src, dst = graph.edge_index.tolist()
    length = graph.edge_kshape.prod(-1).tolist()
    kshape = graph.edge_kshape.tolist()
    etype, role = graph.edge_type.tolist(), graph.edge_role.tolist()
    head, pos = graph.edge_head.tolist(), graph.edge_pos.tolist()
    values = graph.edge_attr.tolist()
    for e in range(len(src)):
        g.add_edge(src[e], dst[e], type=etype[e], role=role[e], head=head[e], pos=pos[e],
                   kshape=tuple(kshape[e]), value=values[e][:length[e]])
    return g


def _positions(graph) -> torch.Tensor:
    """``[N, 2]`` coordinates: x by layer, y spread evenly within (layer, node type)."""
    layer = graph.node_layer.double()
    block = graph.node_layer * 16 + graph.node_type
    y = torch.zeros(graph.num_nodes, dtype=torch.float64)
    for key in torch.unique(block).tolist():
        members = (block == key).nonzero().view(-1)
        members = members[torch.argsort(graph.node_unit[members] * 1000
                                        + graph.node_head[members].clamp(min=0))]
        count = members.numel()
        y[members] = torch.linspace(-1, 1, count, dtype=torch.float64) if count > 1 else 0.0
    # attention: Q, K, V, head nodes of one layer side by side
    offset = torch.zeros(graph.num_nodes, dtype=torch.float64)
    for t, dx in ((NodeType.QUERY, -0.3), (NodeType.KEY, -0.1), (NodeType.VALUE, 0.1),
                  (NodeType.HEAD, 0.3)):
        offset[graph.node_type == t] = dx
    return torch.stack([layer + offset, y], dim=1)


def draw(graph, path: str | Path | None = None, *, title: str | None = None,
         max_edges: int = 20000, ax=None):
    """Draw ``graph`` with nodes laid out by layer; save a PNG when ``path`` is given.

    Weight edges are coloured by sign (red negative, blue positive) with opacity by
    magnitude (a kernel's mean); attention edges by role (Q/K/V/O); residual and norm
    edges are dashed grey; head-membership and QK-pairing edges are thin black.

    Args:
        graph: a :class:`~neuralgraph_quasi.NeuralGraph`.
        path: where to write the PNG (``None``: do not save).
        title: the figure title.
        max_edges: draw at most this many weight edges (the largest by magnitude).
        ax: a matplotlib axis to draw on (a new figure otherwise).

    Returns:
        the matplotlib figure.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    if ax is None:
        layers = int(graph.node_layer.max()) + 1
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * layers), 6), dpi=120)
    else:
        fig = ax.figure
    pos = _positions(graph)
    src, dst = graph.edge_index
    length = graph.edge_kshape.prod(-1)
    width = graph.edge_attr.size(1)
    mask = torch.arange(width) < length[:, None]
    strength = (graph.edge_attr * mask).sum(1) / length.clamp(min=1)
    weight = torch.isin(graph.edge_type, torch.tensor([int(t) for t in WEIGHT_EDGE_TYPES]))
    scale = float(strength[weight].abs().max()) if bool(weight.any()) else 1.0

    chosen = weight.nonzero().view(-1)
    if chosen.numel() > max_edges:
        chosen = chosen[torch.topk(strength[chosen].abs(), max_edges).indices]
    segments = torch.stack([pos[src[chosen]], pos[dst[chosen]]], dim=1).numpy()
    # colour by role (attention) or sign (other weights), opacity by magnitude; one lookup
    # table indexed per edge instead of a Python loop over edges
    to_rgb = matplotlib.colors.to_rgb
    palette = torch.tensor([to_rgb("#2166ac"), to_rgb("#b2182b")]
                           + [to_rgb(_ROLE_COLOURS[r]) for r in (Role.Q, Role.K, Role.V, Role.O)])
    role = graph.edge_role[chosen]
    index = torch.where(role > 0, role + 1, (strength[chosen] < 0).long())
    alpha = 0.08 + 0.8 * strength[chosen].abs().double() / max(scale, 1e-12)
    colours = torch.cat([palette[index], alpha[:, None]], dim=1).numpy()
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.6, zorder=1))

    structural = [
        ((EdgeType.RESIDUAL, EdgeType.NORM), dict(colors="#999999", linestyles="dashed",
                                                    linewidths=0.8)),
        ((EdgeType.HEAD_MEMBER, EdgeType.QK_PAIR), dict(colors="#000000", linewidths=0.3,
                                                          alpha=0.5)),
    ]
    for types, style in structural:
        sel = torch.isin(graph.edge_type, torch.tensor([int(t) for t in types]))
        if bool(sel.any()):
            seg = torch.stack([pos[src[sel]], pos[dst[sel]]], dim=1).numpy()
            ax.add_collection(LineCollection(seg, zorder=1, **style))

    for t, colour in _NODE_COLOURS.items():
        sel = graph.node_type == t
        if bool(sel.any()):
            ax.scatter(pos[sel, 0].numpy(), pos[sel, 1].numpy(), s=14, c=colour, zorder=2,
                       label=NodeType(t).name.lower(), edgecolors="none")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("layer")
    ax.set_yticks([])
    ax.set_title(title or f"{graph.num_nodes} nodes, {graph.num_edges} edges")
    ax.autoscale()
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
