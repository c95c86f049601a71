"""The public checks of :mod:`neuralgraph_quasi.testing`, and ``symmetry.reindex``.

Each helper must pass on what is symmetric and raise on what is not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _sym_helpers import BY_NAME, mixed_batch, outputs

from neuralgraph_quasi import symmetry, to_graph, to_model
from neuralgraph_quasi.testing import (
    assert_equivariant,
    assert_invariant,
    assert_same_function,
    equivariance_error,
)


# -- assert_same_function ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-relu", "transformer-classifier", "mha-kdim-vdim"])
def test_assert_same_function(name: str):
    fam = BY_NAME[name]
    model, other = fam.build(0), fam.build(1)
    x = fam.inputs(torch.Generator().manual_seed(0))
    assert_same_function(fam.wrap(model), fam.wrap(model), x)
    assert_same_function(fam.wrap(model), fam.wrap(copy.deepcopy(model)), x, rtol=0.0)
    with pytest.raises(AssertionError, match="different functions"):
        assert_same_function(fam.wrap(model), fam.wrap(other), x)
    # a tiny perturbation is caught at the float64 default tolerance (1e-9) ...
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        for p in nudged.parameters():
            p.add_(1e-6)
    with pytest.raises(AssertionError):
        assert_same_function(fam.wrap(model), fam.wrap(nudged), x)
    # ... and tolerated with a looser rtol
    assert_same_function(fam.wrap(model), fam.wrap(nudged), x, rtol=1e-3)


def test_assert_same_function_takes_a_bare_tensor():
    fam = BY_NAME["mlp-tanh"]
    model = fam.build(0)
    (x,) = fam.inputs(torch.Generator().manual_seed(1))
    assert_same_function(model, model, x)
    with pytest.raises(AssertionError):
        assert_same_function(model, fam.build(1), x)


# -- invariance --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-relu", "cnn-flatten-hw", "transformer-classifier",
                                  "encoder-layer-pre-relu", "siren"])
def test_network_output_is_invariant_under_every_kind_and_reindexing(name: str):
    fam = BY_NAME[name]
    model = fam.build(2)
    x = fam.inputs(torch.Generator().manual_seed(2))

    def fn(graph):
        return outputs(fam.wrap(to_model(graph, model)), x)

    err = assert_invariant(fn, to_graph(model), generator=torch.Generator().manual_seed(3))
    assert 0.0 <= err < 1e-9
    # and the helper is not blind: adding the first listed weight breaks invariance
    def leaky(graph):
        return fn(graph) + graph.edge_attr[0, 0]

    for kinds in (["reindex"], None):
        with pytest.raises(AssertionError, match="not equivariant"):
            assert_invariant(leaky, to_graph(model), kinds,
                             generator=torch.Generator().manual_seed(4))


def test_network_outputs_of_a_batch_are_invariant():
    batch, _, models, fams = mixed_batch(5)
    gen = torch.Generator().manual_seed(5)
    xs = [f.inputs(gen) for f in fams]

    def fn(b):
        return [outputs(f.wrap(to_model(g, m)), x)
                for g, m, f, x in zip(b.to_data_list(), models, fams, xs, strict=True)]

    assert_invariant(fn, batch, generator=torch.Generator().manual_seed(6), trials=2)


@pytest.mark.parametrize("name", ["mlp-relu", "transformer-block"])
def test_weight_sum_is_not_scale_invariant(name: str):
    graph = to_graph(BY_NAME[name].build(3))
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_invariant(lambda g: g.edge_attr.sum(), graph, ["scale"],
                         generator=torch.Generator().manual_seed(7))
    # but it is invariant to permutations (and to re-indexing), up to round-off
    assert_invariant(lambda g: g.edge_attr.sum(), graph, ["permutation", "reindex"],
                     generator=torch.Generator().manual_seed(8))


def test_invariance_helpers_cast_to_float64():
    fam = BY_NAME["mlp-relu"]
    model = fam.build(4).float()
    graph = to_graph(model)
    assert graph.edge_attr.dtype == torch.float32
    seen = []

    def fn(g):
        seen.append(g.edge_attr.dtype)
        return g.edge_attr.abs().max(0).values

    assert_invariant(fn, graph, ["permutation"], generator=torch.Generator().manual_seed(9))
    assert set(seen) == {torch.float64}


# -- equivariance ------------------------------------------------------------------------------
NODE_EDGE_KINDS = ["permutation", "head_permutation", "reindex"]


@pytest.mark.parametrize("name", ["transformer-classifier", "cnn-avgpool2d", "batch"])
def test_node_and_edge_features_are_permutation_equivariant(name: str):
    graph = mixed_batch(7)[0] if name == "batch" else to_graph(BY_NAME[name].build(5))
    err = assert_equivariant(lambda g: (g.x, g.edge_attr), graph, NODE_EDGE_KINDS,
                             output="permutation", generator=torch.Generator().manual_seed(10))
    assert err == 0.0  # pure re-ordering: exact
    # negative controls: a running sum over nodes depends on their order ...
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(lambda g: (g.x.cumsum(0), g.edge_attr), graph, NODE_EDGE_KINDS,
                           output="permutation", generator=torch.Generator().manual_seed(11))
    with pytest.raises(AssertionError):
        assert_equivariant(lambda g: (g.x, g.edge_attr.flip(0)), graph, ["reindex"],
                           output="permutation", generator=torch.Generator().manual_seed(12))
    # ... and raw features are not equivariant to the continuous kinds
    with pytest.raises(AssertionError):
        assert_equivariant(lambda g: (g.x, g.edge_attr), graph, ["scale", "gl"],
                           output="permutation", generator=torch.Generator().manual_seed(13))


@pytest.mark.parametrize("name", ["transformer-classifier", "mlp-tanh", "batch"])
def test_identity_map_is_graph_equivariant_to_every_kind(name: str):
    graph = mixed_batch(8)[0] if name == "batch" else to_graph(BY_NAME[name].build(6))
    err = assert_equivariant(lambda g: g, graph, output="graph",
                             generator=torch.Generator().manual_seed(14))
    assert err == 0.0
    # a map that re-applies a fixed element is not equivariant (the group is not abelian)
    fixed = symmetry.sample(graph, torch.Generator().manual_seed(15))
    with pytest.raises(AssertionError):
        assert_equivariant(lambda g: symmetry.act(fixed, g), graph,
                           ["permutation", "head_permutation", "gl"], output="graph",
                           generator=torch.Generator().manual_seed(16))


def test_equivariance_error_is_reproducible_with_a_generator():
    graph = to_graph(BY_NAME["mlp-relu"].build(7))

    def fn(g):
        return g.x.cumsum(0), g.edge_attr

    a = equivariance_error(fn, graph, NODE_EDGE_KINDS, generator=torch.Generator().manual_seed(1))
    b = equivariance_error(fn, graph, NODE_EDGE_KINDS, generator=torch.Generator().manual_seed(1))
    assert a == b > 0


# -- reindex -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-relu", "cnn-flatten-hw", "transformer-classifier",
                                  "mha-kdim-vdim", "batchnorm2d-cnn"])
def test_reindex_is_the_same_network_in_another_order(name: str):
    fam = BY_NAME[name]
    model = fam.build(8)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(17)
    for _ in range(2):
        new, nodes, edges = symmetry.reindex(graph, gen)
        n, m = graph.num_nodes, graph.edge_index.size(1)
        assert torch.equal(nodes.sort().values, torch.arange(n))
        assert torch.equal(edges.sort().values, torch.arange(m))
        assert not torch.equal(nodes, torch.arange(n))  # the order did change
        assert not torch.equal(new.x, graph.x)
        assert torch.equal(new.x, graph.x[nodes])
        assert torch.equal(new.edge_attr, graph.edge_attr[edges])
        assert torch.equal(new.node_type, graph.node_type[nodes])
        # edges keep their endpoints: new edge k joins the new ids of old edge edges[k]
        new_id = torch.empty_like(nodes)
        new_id[nodes] = torch.arange(n)
        assert torch.equal(new.edge_index, new_id[graph.edge_index[:, edges]])
        # identical parameters, bit for bit
        back = to_model(new, model)
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


def test_reindex_of_a_batch_stays_within_each_graph():
    batch, _, models, _ = mixed_batch(9)
    new, nodes, _ = symmetry.reindex(batch, torch.Generator().manual_seed(18))
    assert torch.equal(batch.batch[nodes], batch.batch)
    for g, model in zip(new.to_data_list(), models, strict=True):
        back = to_model(g, model)
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
