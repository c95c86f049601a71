"""PyG's own batching of graphs of different architectures: ``Batch.from_data_list`` and
``torch_geometric.loader.DataLoader`` pad kernel vectors as :func:`collate` does, and the
graphs they give back convert to the original models exactly."""

from __future__ import annotations

import io

import pytest
import torch
from _helpers import assert_state_equal, build
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from neuralgraph_quasi import collate, to_graph, to_model
from neuralgraph_quasi.graph import KernelValues
from neuralgraph_quasi.symmetry import act, sample


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _cnn() -> nn.Module:  # Conv1d kernels of 9 values: edge_attr width 9
    return nn.Sequential(nn.Conv1d(2, 3, 9), nn.ReLU(), nn.Conv1d(3, 2, 9),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2, 2)).double()


FACTORIES = [_mlp, _cnn, _mlp, _cnn, _cnn]


@pytest.fixture
def zoo():
    models = [build(f, seed=i) for i, f in enumerate(FACTORIES)]
    graphs = [to_graph(m) for m in models]
    assert [g.kernel_width for g in graphs] == [1, 9, 1, 9, 9]
    return models, graphs


def _round_trips(parts, models, factories) -> None:
    assert len(parts) == len(models)
    for part, model, factory in zip(parts, models, factories, strict=True):
        assert_state_equal(model, to_model(part, build(factory, seed=99)))


def test_batch_from_data_list_of_mlp_and_cnn_graphs(zoo):
    models, graphs = zoo
    batch = Batch.from_data_list(graphs)
    assert batch.edge_attr.shape == (sum(g.num_edges for g in graphs), 9)
    assert type(batch.edge_attr) is torch.Tensor  # the batch is as cheap as before
    start = 0
    for g in graphs:  # each graph's values, zero-padded on the right
        block = batch.edge_attr[start:start + g.num_edges]
        assert torch.equal(block[:, :g.kernel_width], g.edge_attr)
        assert not block[:, g.kernel_width:].any()
        start += g.num_edges
    _round_trips(batch.to_data_list(), models, FACTORIES)


def test_pyg_batch_equals_collate(zoo):
    _, graphs = zoo
    ours, pyg = collate(graphs), Batch.from_data_list(graphs)
    assert sorted(ours.keys()) == sorted(pyg.keys())
    for key in ours.keys():
        a, b = ours[key], pyg[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


@pytest.mark.parametrize("batch_size, workers", [(2, 0), (3, 0), (2, 1)])
def test_dataloader_over_mixed_architectures(zoo, batch_size, workers):
    models, graphs = zoo
    loader = DataLoader(graphs, batch_size=batch_size, shuffle=False, num_workers=workers)
    parts, widths = [], []
    for batch in loader:
        widths.append(batch.edge_attr.size(1))
        parts.extend(batch.to_data_list())
    assert widths == [max(g.kernel_width for g in graphs[i:i + batch_size])
                      for i in range(0, len(graphs), batch_size)]
    _round_trips(parts, models, FACTORIES)


def test_moved_copied_and_reloaded_graphs_still_batch(zoo):
    models, graphs = zoo
    element = sample(graphs[1], torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(graphs[3], buffer)
    buffer.seek(0)
    others = [act(element, graphs[1]), graphs[0].clone(), graphs[2].to("cpu"),
              torch.load(buffer, weights_only=True)]
    for g in others:
        assert isinstance(g.edge_attr, KernelValues)
    batch = Batch.from_data_list(others)
    moved, mlp, mlp2, cnn = batch.to_data_list()
    assert_state_equal(to_model(act(element, graphs[1]), models[1]), to_model(moved, models[1]))
    assert_state_equal(models[0], to_model(mlp, models[0]))
    assert_state_equal(models[2], to_model(mlp2, models[2]))
    assert_state_equal(models[3], to_model(cnn, models[3]))


def test_a_metanetwork_reads_the_pyg_batch_like_a_collate_batch(zoo):
    from neuralgraph_quasi.nn import QuasiGNN

    _, graphs = zoo
    torch.manual_seed(0)
    net = QuasiGNN(hidden_dim=8, num_layers=2, kernel_width=9).double().eval()
    with torch.no_grad():
        assert torch.equal(net(Batch.from_data_list(graphs)), net(collate(graphs)))


def test_negative_control_plain_data_of_two_widths_does_not_batch(zoo):
    """The padding belongs to NeuralGraph's kernel values: plain PyG data still fails."""
    _, graphs = zoo
    plain = [Data(edge_index=g.edge_index, edge_attr=g.edge_attr.as_subclass(torch.Tensor),
                  num_nodes=g.num_nodes) for g in graphs[:2]]
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        Batch.from_data_list(plain)


def test_kernel_values_pad_only_when_edges_are_concatenated(zoo):
    _, graphs = zoo
    a, b = graphs[0].edge_attr, graphs[1].edge_attr
    both = torch.cat([a, b])
    assert both.shape == (a.size(0) + b.size(0), 9) and type(both) is torch.Tensor
    assert torch.equal(both[:a.size(0), 0], a[:, 0]) and not both[:a.size(0), 1:].any()
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        torch.cat([a[:3], b[:4]], dim=1)  # along the kernel axis: no padding
    assert type(a * 2) is torch.Tensor  # computations give plain tensors


def test_parts_of_two_batches_of_different_widths_batch_again(zoo):
    """Graphs out of to_data_list() keep KernelValues too (PyG writes them into the graph's
    storage, which keeps the type)."""
    models, graphs = zoo
    narrow = Batch.from_data_list([graphs[0], graphs[2]]).to_data_list()  # widths 1
    wide = Batch.from_data_list([graphs[1], graphs[3]]).to_data_list()  # widths 9
    assert all(isinstance(g.edge_attr, KernelValues) for g in narrow + wide)
    order = [0, 2, 1, 3]
    for batcher in (Batch.from_data_list, collate):
        parts = batcher(narrow + wide).to_data_list()
        _round_trips(parts, [models[i] for i in order], [FACTORIES[i] for i in order])


def test_graphs_saved_with_plain_storage_load_as_kernel_values(zoo):
    """A graph file written before KernelValues (plain tensor in a plain GlobalStorage)."""
    from torch_geometric.data.storage import GlobalStorage

    models, graphs = zoo
    old = graphs[1].clone()
    plain = GlobalStorage(_parent=old)
    for key, value in old._store.items():
        plain[key] = value.as_subclass(torch.Tensor) if key == "edge_attr" else value
    old.__dict__["_store"] = plain
    assert type(old.edge_attr) is torch.Tensor
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert isinstance(loaded.edge_attr, KernelValues)
    batch = Batch.from_data_list([graphs[0], loaded])
    assert_state_equal(models[1], to_model(batch.to_data_list()[1], models[1]))
