"""Symmetries of batches of mixed architectures, and the RandomSymmetry transform."""

from __future__ import annotations

import pytest
import torch
from _sym_helpers import (
    BY_NAME,
    KINDS,
    assert_graphs_close,
    assert_graphs_equal,
    max_abs_diff,
    mixed_batch,
)
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from neuralgraph_quasi import collate, to_graph, to_graphs, to_model
from neuralgraph_quasi.graph import WEIGHT_EDGE_TYPES, EdgeType, NodeType
from neuralgraph_quasi.symmetry import GroupElement, RandomSymmetry, act, sample
from neuralgraph_quasi.testing import assert_same_function

RTOL = 1e-9


def _slice(e: GroupElement, lo: int, hi: int) -> GroupElement:
    """The part of a batch element acting on the nodes ``lo:hi`` of one graph."""
    perm = e.perm[lo:hi] - lo
    assert bool(((perm >= 0) & (perm < hi - lo)).all()), "a node map crosses graphs"
    rows = (e.heads >= lo) & (e.heads < hi)
    return GroupElement(perm, e.scale[lo:hi], e.heads[rows] - lo, e.M[rows], e.N[rows])


def test_sample_of_a_batch_is_one_element_acting_graph_by_graph():
    batch, _, _, _ = mixed_batch(0)
    parts = batch.to_data_list()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        e = sample(batch, gen)
        assert isinstance(e, GroupElement) and e.num_nodes == batch.num_nodes
        moved = act(e, batch)
        assert isinstance(moved, Batch) and moved.num_graphs == batch.num_graphs
        for i, (got, graph) in enumerate(zip(moved.to_data_list(), parts, strict=True)):
            lo, hi = int(batch.ptr[i]), int(batch.ptr[i + 1])
            expected = act(_slice(e, lo, hi), graph)
            assert_graphs_close(got, expected, atol=1e-13)


def test_acted_batch_converts_back_to_equivalent_networks():
    batch, graphs, models, fams = mixed_batch(10)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        moved = act(sample(batch, gen), batch)
        for graph, g, model, fam in zip(graphs, moved.to_data_list(), models, fams, strict=True):
            assert max_abs_diff(g.edge_attr[:, :graph.kernel_width], graph.edge_attr) > 1e-3
            other = to_model(g, model)
            assert_same_function(fam.wrap(model), fam.wrap(other), fam.inputs(gen), rtol=RTOL)


def test_heads_of_a_batch_element_are_the_attention_graphs_heads():
    batch, graphs, _, _ = mixed_batch(20)
    e = sample(batch, torch.Generator().manual_seed(3))
    counts = [int((g.node_type == NodeType.HEAD).sum()) for g in graphs]
    assert e.heads.numel() == sum(counts)
    owner = batch.batch[e.heads]
    assert torch.equal(torch.bincount(owner, minlength=len(graphs)), torch.tensor(counts))
    # one factor width for the whole batch: the widest head (d_head 4), identity-padded
    assert e.M.shape[-1] == 4


def test_each_graph_of_a_batch_gets_an_independent_factor():
    fam = BY_NAME["mlp-relu"]
    model = fam.build(0)
    batch = collate([to_graph(model), to_graph(model)])
    e = sample(batch, torch.Generator().manual_seed(4))
    ptr = batch.ptr.tolist()
    first, second = e.scale[ptr[0]:ptr[1]], e.scale[ptr[1]:ptr[2]]
    assert not torch.equal(first, second)
    moved = act(e, batch).to_data_list()
    assert max_abs_diff(moved[0].edge_attr, moved[1].edge_attr) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_that_do_not_apply_to_a_graph_of_the_batch_skip_it(kind: str):
    batch, graphs, _, fams = mixed_batch(30)
    gen = torch.Generator().manual_seed(5)
    shifts = {f.name: 0.0 for f in fams}
    for _ in range(3):
        moved = act(sample(batch, gen, kinds=[kind]), batch).to_data_list()
        for fam, before, after in zip(fams, batch.to_data_list(), moved, strict=True):
            if kind not in fam.kinds:
                assert_graphs_equal(after, before)
            shifts[fam.name] = max(shifts[fam.name], max_abs_diff(after.edge_attr,
                                                                   before.edge_attr))
    for fam in fams:
        if kind in fam.kinds:
            assert shifts[fam.name] > 1e-3, (kind, fam.name)


def test_gl_on_a_batch_leaves_the_mlp_and_moves_the_transformer():
    batch, _, _, fams = mixed_batch(40, names=("mlp-relu", "transformer-classifier"))
    e = sample(batch, torch.Generator().manual_seed(6), kinds=["gl"])
    mlp_before, tf_before = batch.to_data_list()
    mlp_after, tf_after = act(e, batch).to_data_list()
    assert_graphs_equal(mlp_after, mlp_before)
    q = tf_before.edge_type == EdgeType.ATTN_Q
    assert max_abs_diff(tf_after.edge_attr[q], tf_before.edge_attr[q]) > 1e-3


# -- RandomSymmetry ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-relu", "cnn-avgpool2d", "transformer-classifier",
                                  "encoder-layer-pre-gelu", "siren"])
def test_random_symmetry_preserves_the_function_and_differs_per_call(name: str):
    fam = BY_NAME[name]
    model = fam.build(1)
    graph = to_graph(model)
    before = graph.edge_attr.clone()
    transform = RandomSymmetry(generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(8)
    first, second = transform(graph), transform(graph)
    assert torch.equal(graph.edge_attr, before)  # the input is not modified
    for out in (first, second):
        assert max_abs_diff(out.edge_attr, graph.edge_attr) > 1e-3
        assert_same_function(fam.wrap(model), fam.wrap(to_model(out, model)), fam.inputs(gen),
                             rtol=RTOL)
    assert max_abs_diff(first.edge_attr, second.edge_attr) > 1e-3


def test_random_symmetry_respects_kinds_range_and_generator():
    fam = BY_NAME["mlp-relu"]
    graph = to_graph(fam.build(2))
    w = torch.tensor([int(t) for t in WEIGHT_EDGE_TYPES])
    weights = torch.isin(graph.edge_type, w)
    # permutations only: the multiset of weights is unchanged
    perm_only = RandomSymmetry(kinds=["permutation"], generator=torch.Generator().manual_seed(9))
    out = perm_only(graph)
    assert torch.equal(out.edge_attr[weights].view(-1).sort().values,
                       graph.edge_attr[weights].view(-1).sort().values)
    assert not torch.equal(out.edge_attr, graph.edge_attr)
    # the same seed gives the same augmentation
    a = RandomSymmetry(scale_range=(0.1, 0.5), generator=torch.Generator().manual_seed(10))
    b = RandomSymmetry(scale_range=(0.1, 0.5), generator=torch.Generator().manual_seed(10))
    assert_graphs_equal(a(graph), b(graph))
    assert "permutation" in repr(perm_only)


def test_random_symmetry_as_a_dataset_transform():
    """Augmenting a zoo (one architecture, many weights) and batching the result."""
    fam = BY_NAME["transformer-block"]
    zoo = [fam.build(seed) for seed in range(4)]
    graphs = to_graphs(zoo[0], [m.state_dict() for m in zoo])
    transform = RandomSymmetry(kinds=None, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(12)
    for _epoch in range(2):
        augmented = [transform(g) for g in graphs]
        loader = DataLoader(augmented, batch_size=2, shuffle=False)
        seen = 0
        for batch in loader:
            for g in batch.to_data_list():
                model = zoo[seen]
                other = to_model(g, model)
                assert_same_function(model, other, fam.inputs(gen), rtol=RTOL)
                assert max_abs_diff(g.edge_attr, graphs[seen].edge_attr) > 1e-3
                seen += 1
        assert seen == len(zoo)
    # to_graphs shares structure tensors between graphs: augmenting one left the others alone
    for g, m in zip(graphs, zoo, strict=True):
        assert torch.equal(g.edge_attr, to_graph(m).edge_attr)


def test_random_symmetry_on_a_batch():
    batch, _, models, fams = mixed_batch(50)
    out = RandomSymmetry(generator=torch.Generator().manual_seed(13))(batch)
    gen = torch.Generator().manual_seed(14)
    for g, model, fam in zip(out.to_data_list(), models, fams, strict=True):
        assert_same_function(fam.wrap(model), fam.wrap(to_model(g, model)), fam.inputs(gen),
                             rtol=RTOL)
