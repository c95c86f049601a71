"""Batching, serialisation and zoo conversion of graphs."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_state_equal, build
from torch import nn
from torch_geometric.data import Batch

from neuralgraph_quasi import NeuralGraph, collate, models, to_graph, to_graphs, to_model

# graph-local ids that batching must leave alone
UNSHIFTED = ("edge_type", "edge_role", "edge_head", "edge_pos", "edge_layer", "edge_param",
             "edge_offset", "edge_kshape", "node_type", "node_op", "node_layer", "node_perm",
             "node_unit", "node_head", "node_pos", "node_act", "node_param", "node_offset")

ZOO = [
    ("mlp", lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))),
    ("cnn-3x3", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))),
    ("cnn-5x5", lambda: nn.Sequential(nn.Conv2d(1, 2, 5), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(2 * 4 * 4, 3))),  # 8x8 input
    ("cnn-batchnorm", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                            nn.Linear(2, 2))),
    ("transformer", lambda: models.TransformerBlock(8, 2, 16)),
    ("encoder-layer", lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
]


@pytest.fixture
def zoo():
    originals = [build(factory, seed=i) for i, (_, factory) in enumerate(ZOO)]
    return originals, [to_graph(m) for m in originals]


def test_collate_mixed_architectures_round_trips(zoo):
    originals, graphs = zoo
    assert sorted({g.kernel_width for g in graphs}) == [1, 9, 25]
    batch = collate(graphs)
    assert batch.num_graphs == len(graphs)
    assert batch.edge_attr.shape == (sum(g.num_edges for g in graphs), 25)
    assert batch.x.shape == (sum(g.num_nodes for g in graphs), 4)

    parts = batch.to_data_list()
    assert len(parts) == len(graphs)
    for (name, factory), model, g, part in zip(ZOO, originals, graphs, parts, strict=True):
        assert isinstance(part, NeuralGraph), name
        assert part.spec == g.spec, name
        assert part.kernel_width == 25, name
        # the original values, zero-padded on the right
        w = g.kernel_width
        assert torch.equal(part.edge_attr[:, :w], g.edge_attr), name
        assert not part.edge_attr[:, w:].any(), name
        assert torch.equal(part.x, g.x), name
        like = build(factory, seed=100)
        assert_state_equal(model, to_model(part, like))


def test_batching_shifts_edge_index_only(zoo):
    _, graphs = zoo
    batch = collate(graphs)
    offsets = torch.tensor([0] + [g.num_nodes for g in graphs]).cumsum(0)
    shifted = [g.edge_index + off for g, off in zip(graphs, offsets[:-1], strict=True)]
    expected = torch.cat(shifted, dim=1)
    assert torch.equal(batch.edge_index, expected)
    assert torch.equal(batch.ptr, offsets)
    assert torch.equal(batch.batch, torch.repeat_interleave(
        torch.arange(len(graphs)), torch.tensor([g.num_nodes for g in graphs])))
    for key in UNSHIFTED:
        assert torch.equal(batch[key], torch.cat([g[key] for g in graphs])), key
    assert batch.spec == [g.spec for g in graphs]


def test_collate_does_not_modify_its_inputs(zoo):
    _, graphs = zoo
    widths = [g.kernel_width for g in graphs]
    collate(graphs)
    assert [g.kernel_width for g in graphs] == widths


def test_collate_of_nothing_raises():
    with pytest.raises(ValueError):
        collate([])


def test_pad_kernels():
    g = to_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1)))
    padded = g.pad_kernels(12)
    assert padded.kernel_width == 12 and g.kernel_width == 9
    assert torch.equal(padded.edge_attr[:, :9], g.edge_attr)
    assert not padded.edge_attr[:, 9:].any()
    assert torch.equal(padded.edge_index, g.edge_index)
    assert g.pad_kernels(9) is not g and torch.equal(g.pad_kernels(9).edge_attr, g.edge_attr)
    with pytest.raises(ValueError, match="9"):
        g.pad_kernels(4)


def test_plain_batch_of_same_width_graphs():
    factories = [lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
                 lambda: models.siren(2, 8, 2, 1),
                 lambda: models.SelfAttention(4, 2)]
    originals = [build(f, seed=i) for i, f in enumerate(factories)]
    graphs = [to_graph(m) for m in originals]
    batch = Batch.from_data_list(graphs)
    assert batch.edge_attr.shape == (sum(g.num_edges for g in graphs), 1)
    for factory, model, part in zip(factories, originals, batch.to_data_list(), strict=True):
        assert_state_equal(model, to_model(part, build(factory, seed=50)))


def test_save_load_weights_only(tmp_path):
    factory = ZOO[1][1]
    model = build(factory, seed=0)
    g = to_graph(model)
    path = tmp_path / "graph.pt"
    torch.save(g, path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, NeuralGraph)
    assert loaded.spec == g.spec
    for key, value in g:
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, loaded[key]), key
    assert_state_equal(model, to_model(loaded, build(factory, seed=1)))

    # a list of graphs of different architectures, as a dataset would store them
    originals = [build(f, seed=i) for i, (_, f) in enumerate(ZOO)]
    torch.save([to_graph(m) for m in originals], tmp_path / "graphs.pt")
    loaded = torch.load(tmp_path / "graphs.pt", weights_only=True)
    for (_, f), m, lg in zip(ZOO, originals, loaded, strict=True):
        assert_state_equal(m, to_model(lg, build(f, seed=9)))


@pytest.mark.parametrize("index", range(len(ZOO)), ids=[name for name, _ in ZOO])
def test_to_graphs_matches_to_graph(index):
    _, factory = ZOO[index]
    originals = [build(factory, seed=s) for s in range(5)]
    states = [m.state_dict() for m in originals]
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    like = build(factory, seed=99)
    from_list = to_graphs(like, states)
    from_dict = to_graphs(like, stacked)
    chunked = to_graphs(like, stacked, chunk=2)
    assert len(from_list) == len(from_dict) == len(chunked) == 5
    for model, a, b, c in zip(originals, from_list, from_dict, chunked, strict=True):
        ref = to_graph(model)
        for g in (a, b, c):
            assert isinstance(g, NeuralGraph)
            assert g.spec == ref.spec
            assert g.edge_attr.dtype == ref.edge_attr.dtype
            assert torch.equal(g.edge_attr, ref.edge_attr)
            assert torch.equal(g.x, ref.x)
            assert torch.equal(g.edge_index, ref.edge_index)
            assert torch.equal(g.node_perm, ref.node_perm)
        assert_state_equal(model, to_model(a, like))
    # graphs of a zoo batch together
    batch = Batch.from_data_list(from_dict)
    assert batch.num_graphs == 5
    # replacing one graph's values leaves the others alone
    from_dict[0].edge_attr = from_dict[0].edge_attr.double()
    from_dict[0].x = torch.zeros_like(from_dict[0].x)
    assert from_dict[1].edge_attr.dtype == torch.float32
    assert torch.equal(from_dict[1].x, to_graph(originals[1]).x)
