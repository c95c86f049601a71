"""Every sampled group element maps a network to a different one computing the same function.

For every layer family the converter supports: the full group (``kinds=None``) and each
kind on its own. A kind that applies must move the weights and preserve the function
(relative error < 1e-9 in float64); a kind that does not apply must be skipped (the
identity element, the graph left exactly as it was).
"""

from __future__ import annotations

import pytest
import torch
from _sym_helpers import (
    BY_NAME,
    FAMILIES,
    FAMILY_IDS,
    KINDS,
    Family,
    max_abs_diff,
    mlp,
    randomize,
)
from torch import nn

from neuralgraph_quasi import ConversionError, symmetry, to_graph, to_model
from neuralgraph_quasi.graph import Act, EdgeType, NodeType
from neuralgraph_quasi.testing import assert_same_function

RTOL = 1e-9
MOVED = 1e-3


def _is_identity(e: symmetry.GroupElement) -> bool:
    eye = torch.eye(e.M.size(-1), dtype=e.M.dtype).expand_as(e.M)
    return (torch.equal(e.perm, torch.arange(e.num_nodes))
            and bool((e.scale == 1).all())
            and torch.equal(e.M, eye) and torch.equal(e.N, eye))


def _check_preserved(fam: Family, model: nn.Module, graph, element, gen) -> float:
    """Act, convert back, compare on fresh random inputs; returns how far the weights moved."""
    moved = symmetry.act(element, graph)
    assert moved.edge_attr.dtype == torch.float64
    assert torch.equal(moved.edge_index, graph.edge_index)  # structure unchanged
    other = to_model(moved, model)
    for _ in range(2):
        assert_same_function(fam.wrap(model), fam.wrap(other), fam.inputs(gen), rtol=RTOL)
    return max(max_abs_diff(moved.edge_attr, graph.edge_attr), max_abs_diff(moved.x, graph.x))


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_full_group_moves_weights_and_preserves_function(fam: Family):
    model = fam.build(seed=0)
    graph = to_graph(model)
    before = graph.edge_attr.clone(), graph.x.clone()
    gen = torch.Generator().manual_seed(101)
    for _ in range(3):
        element = symmetry.sample(graph, gen)  # kinds=None: the largest known group
        assert element.num_nodes == graph.num_nodes
        moved = symmetry.act(element, graph)
        # weights really change (edge values, not only biases)
        assert max_abs_diff(moved.edge_attr, graph.edge_attr) > MOVED
        _check_preserved(fam, model, graph, element, gen)
    # act never modifies its input
    assert torch.equal(graph.edge_attr, before[0]) and torch.equal(graph.x, before[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_each_kind_alone(fam: Family, kind: str):
    model = fam.build(seed=1)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(202)
    if kind not in fam.kinds:
        # kinds that do not apply are skipped: identity element, graph untouched
        element = symmetry.sample(graph, gen, kinds=[kind])
        assert _is_identity(element)
        moved = symmetry.act(element, graph)
        assert torch.equal(moved.edge_attr, graph.edge_attr)
        assert torch.equal(moved.x, graph.x)
        return
    shifts = []
    for _ in range(3):
        element = symmetry.sample(graph, gen, kinds=[kind])
        shifts.append(_check_preserved(fam, model, graph, element, gen))
    assert max(shifts) > MOVED, f"{kind} applies to {fam.name} but never moved its weights"


@pytest.mark.parametrize("name", ["mlp-relu", "cnn-avgpool2d", "transformer-classifier",
                                  "batchnorm1d-mlp", "embedding-mlp"])
def test_scale_ranges_below_one(name: str):
    fam = BY_NAME[name]
    model = fam.build(seed=2)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(303)
    mask = symmetry.scalable_nodes(graph)
    assert bool(mask.any())
    for _ in range(3):
        element = symmetry.sample(graph, gen, kinds=["scale"], scale_range=(1e-2, 0.5))
        s = element.scale
        assert bool(((s[mask] >= 1e-2) & (s[mask] <= 0.5)).all())
        assert bool((s[~mask] == 1).all())
        assert _check_preserved(fam, model, graph, element, gen) > MOVED


def test_wide_scale_range_on_relu_mlp():
    fam = BY_NAME["mlp-relu"]
    model = fam.build(seed=3)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(404)
    mask = symmetry.scalable_nodes(graph)
    # exactly the hidden units of a ReLU MLP are scalable
    assert torch.equal(mask, graph.node_type == NodeType.HIDDEN)
    for _ in range(3):
        element = symmetry.sample(graph, gen, kinds=["scale"], scale_range=(1e-2, 1e2))
        s = element.scale
        assert bool(((s[mask] >= 1e-2) & (s[mask] <= 1e2)).all())
        assert float(s[mask].max() / s[mask].min()) > 2  # spread, not one common factor
        assert torch.equal(element.perm, torch.arange(graph.num_nodes))
        assert _check_preserved(fam, model, graph, element, gen) > MOVED


def test_sign_on_tanh_mlp_flips_some_units():
    fam = BY_NAME["mlp-tanh"]
    model = fam.build(seed=4)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(505)
    mask = symmetry.sign_flippable_nodes(graph)
    assert torch.equal(mask, graph.node_type == NodeType.HIDDEN)
    flipped = 0
    for _ in range(3):
        element = symmetry.sample(graph, gen, kinds=["sign"])
        s = element.scale
        assert bool((s.abs() == 1).all()) and bool((s[~mask] == 1).all())
        flipped += int((s == -1).sum())
        _check_preserved(fam, model, graph, element, gen)
    assert flipped > 0


@pytest.mark.parametrize("name", ["self-attention", "self-attention-bias", "mha-packed",
                                  "mha-kdim-vdim", "transformer-block"])
def test_gl_moves_every_attention_projection_and_nothing_else(name: str):
    fam = BY_NAME[name]
    model = fam.build(seed=5)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(606)
    attn = (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O)
    for _ in range(2):
        element = symmetry.sample(graph, gen, kinds=["gl"])
        moved = symmetry.act(element, graph)
        for etype in attn:
            sel = graph.edge_type == etype
            assert max_abs_diff(moved.edge_attr[sel], graph.edge_attr[sel]) > MOVED, etype.name
        other = ~torch.isin(graph.edge_type, torch.tensor([int(t) for t in attn]))
        assert torch.equal(moved.edge_attr[other], graph.edge_attr[other])
        _check_preserved(fam, model, graph, element, gen)


@pytest.mark.parametrize("name", ["mlp-relu", "cnn-flatten-hw", "transformer-classifier",
                                  "mha-kdim-vdim", "siren", "batchnorm2d-cnn"])
def test_act_on_a_module_returns_an_equivalent_module(name: str):
    fam = BY_NAME[name]
    model = fam.build(seed=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(707)
    for _ in range(2):
        element = symmetry.sample(to_graph(model), gen)
        other = symmetry.act(element, model)
        assert isinstance(other, nn.Module) and type(other) is type(model)
        assert other is not model
        changed = [k for k, v in other.state_dict().items()
                   if v.is_floating_point() and not torch.allclose(v, state[k], atol=MOVED)]
        assert changed, "the element changed no parameter"
        assert_same_function(fam.wrap(model), fam.wrap(other), fam.inputs(gen), rtol=RTOL)
        # the same as acting on the graph and converting back
        via_graph = to_model(symmetry.act(element, to_graph(model)), model)
        for key, value in via_graph.state_dict().items():
            assert torch.equal(value, other.state_dict()[key]), key
    for key, value in model.state_dict().items():  # the input module is untouched
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("norm", ["batchnorm1d-mlp", "batchnorm2d-cnn"])
def test_scaled_batchnorm_output_is_exact_in_training_mode(norm: str):
    """Scaling an affine BatchNorm's output (gain and shift) is exact with batch statistics."""
    fam = BY_NAME[norm]
    model = fam.build(seed=7)
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(808)
    for _ in range(2):
        other = to_model(symmetry.act(symmetry.sample(graph, gen), graph), model)
        x = fam.inputs(gen)
        with torch.no_grad():
            a, b = model.train()(*x), other.train()(*x)
        assert float((a - b).norm() / a.norm()) < RTOL


def test_shared_activation_instance_in_sequential():
    """``act = nn.ReLU(); nn.Sequential(Linear, act, Linear, act, Linear)`` applies ReLU
    twice. ``to_graph`` may refuse such a model, but must not describe the second hidden
    layer as linear: a sampled sign flip (or scale) would then change the function."""
    shared = nn.ReLU()
    model = randomize(nn.Sequential(nn.Linear(3, 6), shared, nn.Linear(6, 5), shared,
                                    nn.Linear(5, 2)).double(), 8)
    try:
        graph = to_graph(model)
    except ConversionError:
        return  # refusing is safe
    hidden = graph.node_type == NodeType.HIDDEN
    assert bool((graph.node_act[hidden] == Act.RELU).all()), graph.node_act.tolist()
    gen = torch.Generator().manual_seed(909)
    for _ in range(3):
        other = to_model(symmetry.act(symmetry.sample(graph, gen), graph), model)
        x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
        assert_same_function(model, other, x, rtol=RTOL)


@pytest.mark.parametrize("name", ["mlp-relu", "transformer-classifier"])
def test_float32_graphs_stay_float32_and_equivalent(name: str):
    fam = BY_NAME[name]
    model = fam.build(seed=9).float()
    graph = to_graph(model)
    gen = torch.Generator().manual_seed(1010)
    moved = symmetry.act(symmetry.sample(graph, gen), graph)
    assert moved.edge_attr.dtype == moved.x.dtype == torch.float32
    other = to_model(moved, model)
    x = tuple(t.float() if t.is_floating_point() else t for t in fam.inputs(gen))
    assert_same_function(model, other, x)  # float32 tolerance (1e-4)
    assert max_abs_diff(moved.edge_attr, graph.edge_attr) > MOVED


def test_mlp_helper_uses_distinct_activation_modules():
    """Guard for the family catalogue: the shared-instance case is tested on its own above."""
    model = mlp(nn.ReLU())
    acts = [m for m in model if isinstance(m, nn.ReLU)]
    assert len(acts) == 2 and acts[0] is not acts[1]
