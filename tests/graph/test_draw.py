"""to_networkx keeps every node and edge with its attributes; draw writes a PNG."""

from __future__ import annotations

from torch import nn

from neuralgraph_quasi import draw, models, to_graph, to_networkx
from neuralgraph_quasi.graph import EdgeType


def test_networkx_export_keeps_nodes_edges_and_true_kernel_values():
    model = nn.Sequential(nn.Conv2d(1, 2, (3, 5)), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(2, 3))
    graph = to_graph(model)
    g = to_networkx(graph)
    assert g.number_of_nodes() == graph.num_nodes
    assert g.number_of_edges() == graph.num_edges
    kernel = model[0].weight[1, 0].reshape(-1).tolist()
    conv_edges = [d for _, _, d in g.edges(data=True) if d["type"] == EdgeType.CONV]
    assert any(d["value"] == kernel for d in conv_edges)
    assert all(len(d["value"]) == 15 and d["kshape"] == (3, 5) for d in conv_edges)
    linear = [d for _, _, d in g.edges(data=True) if d["type"] == EdgeType.LINEAR]
    assert all(len(d["value"]) == 1 for d in linear)  # padding trimmed


def test_attention_roles_survive_export():
    g = to_networkx(to_graph(models.SelfAttention(4, 2)))
    roles = [d["role"] for _, _, d in g.edges(data=True)]
    assert {r: roles.count(r) for r in set(roles)} == {0: 16, 1: 16, 2: 16, 3: 16, 4: 16}


def test_draw_writes_a_png(tmp_path):
    path = tmp_path / "block.png"
    draw(to_graph(models.TransformerBlock(8, 2, 12)), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
