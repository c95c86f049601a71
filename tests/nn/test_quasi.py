"""QuasiGNN: declared invariances hold on mixed batches, α is a valid group element that
matters where it should and cancels where it must, and edits are quasi-equivariant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralgraph_quasi import collate, models, to_graph, to_model
from neuralgraph_quasi.nn import (
    FlatMLP,
    QuasiGNN,
    StatNN,
    count_parameters,
    flat_parameters,
    gl_invariant_view,
)
from neuralgraph_quasi.symmetry import act, sample
from neuralgraph_quasi.testing import assert_invariant, assert_same_function, equivariance_error

INVARIANCE_TOL = 1e-6


def _relu_mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _transformer():
    return models.TransformerClassifier(dim=8, depth=1, heads=2, hidden=12, num_classes=3)


FACTORIES = {"mlp": _relu_mlp, "cnn": _cnn, "transformer": _transformer}
INPUTS = {"mlp": lambda: torch.randn(6, 3, dtype=torch.float64),
          "cnn": lambda: torch.randn(2, 1, 9, 9, dtype=torch.float64),
          "transformer": lambda: torch.randn(2, 5, 8, dtype=torch.float64)}


def _models(names, seed: int = 0):
    torch.manual_seed(seed)
    return [FACTORIES[n]().double().eval() for n in names]


def _batch(names, seed: int = 0):
    mods = _models(names, seed)
    return collate([to_graph(m) for m in mods]), mods


def _net(*, eps: float = 0.01, seed: int = 1, **kwargs) -> QuasiGNN:
    torch.manual_seed(seed)
    net = QuasiGNN(8, 3, eps_init=eps, **kwargs).double().eval()
    return net


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- invariance of predictions ---------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["mpnn", "scale_mpnn"])
@pytest.mark.parametrize("quasi", [True, False], ids=["quasi", "plain"])
def test_predictions_are_invariant_to_every_declared_kind_on_a_mixed_batch(backbone, quasi):
    batch, _ = _batch(["mlp", "cnn", "transformer"])
    net = _net(eps=0.5, backbone=backbone, quasi=quasi)
    expected = {"permutation", "head_permutation"} | ({"scale"} if backbone == "scale_mpnn"
                                                      else set())
    assert net.invariant_to == expected and net.equivariant_to == frozenset()
    err = assert_invariant(net, batch, [*net.invariant_to, "reindex"], tol=INVARIANCE_TOL,
                           generator=_generator(), scale_range=(1e-2, 1e2))
    assert err < INVARIANCE_TOL


@pytest.mark.parametrize("kind,names", [("scale", ["mlp", "cnn"]), ("gl", ["transformer"])])
def test_negative_control_the_mpnn_model_is_not_invariant_to_what_it_does_not_declare(kind,
                                                                                       names):
    batch, _ = _batch(names)
    net = _net(eps=0.5)
    assert kind not in net.invariant_to
    err = equivariance_error(net, batch, [kind], output="invariant", generator=_generator())
    assert err > 1e-6  # ten orders of magnitude above float64 round-off


# -- the α-map -------------------------------------------------------------------------------

def test_alpha_starts_within_one_percent_of_the_identity():
    batch, _ = _batch(["mlp", "cnn", "transformer"])
    net = _net()
    net(batch)
    alpha = net.last_alpha
    assert torch.allclose(net.alpha.eps, torch.full((3,), 0.01, dtype=torch.float64))
    assert float((alpha.scale.detach() - 1).abs().max()) <= 0.01
    assert float((alpha.scale.detach() - 1).abs().max()) > 0  # scalable units do get a scale
    eye = torch.eye(alpha.M.size(-1), dtype=alpha.M.dtype)
    for factor in (alpha.M, alpha.N):
        assert float((factor - eye).abs().max()) <= 0.01
        assert float((factor - eye).abs().max()) > 0


def test_alpha_is_a_valid_group_element_even_with_large_eps():
    """α(θ) acting on the input network's own weights leaves its function unchanged."""
    names = ["mlp", "cnn", "transformer"]
    batch, mods = _batch(names)
    net = _net(eps=0.9)
    net(batch)
    element = net.last_alpha.element()
    assert bool((element.scale > 0).all())
    moved = act(element, batch).to_data_list()
    torch.manual_seed(3)
    for name, model, graph in zip(names, mods, moved, strict=True):
        twin = to_model(graph, model)
        assert not torch.equal(flat_parameters(graph), flat_parameters(to_graph(model)))
        assert_same_function(model, twin, INPUTS[name]())


def test_alpha_changes_the_prediction_of_the_default_model():
    batch, _ = _batch(["mlp", "cnn", "transformer"])
    net = _net()
    with_alpha = net(batch)
    net.alpha.frozen = True
    without = net(batch)
    assert _relative(with_alpha, without) > 1e-6


def test_gradients_reach_eps_and_gamma():
    batch, _ = _batch(["mlp", "transformer"])
    net = _net().train()
    net(batch).sum().backward()
    assert bool((net.alpha.rho.grad != 0).all())
    for gamma in (net.alpha.gamma_scale, net.alpha.gamma_qk, net.alpha.gamma_vo):
        grads = [p.grad for p in gamma.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_frozen_alpha_is_exactly_the_identity_and_keeps_the_parameters():
    batch, _ = _batch(["mlp", "transformer"])
    frozen = _net(alpha="frozen")
    learned = _net(alpha="learned")
    assert sum(p.numel() for p in frozen.parameters()) == \
        sum(p.numel() for p in learned.parameters())
    assert not frozen.alpha.rho.requires_grad
    frozen(batch)
    alpha = frozen.last_alpha
    assert torch.equal(alpha.scale, torch.ones_like(alpha.scale))
    assert torch.equal(alpha.M, torch.eye(alpha.M.size(-1), dtype=alpha.M.dtype)
                       .expand_as(alpha.M))
    plain = _net(quasi=False)
    plain.load_state_dict({k: v for k, v in frozen.state_dict().items()
                           if not k.startswith("alpha.")})
    assert torch.allclose(frozen(batch), plain(batch), rtol=1e-12, atol=0)


def test_alpha_cancels_in_a_fully_scale_equivariant_pipeline():
    """Scale part of α before scale-equivariant layers and a scale-invariant readout: exact
    cancellation, ψ(α(θ)·y) = ψ(y), so the prediction equals the one with α frozen."""
    batch, _ = _batch(["mlp", "cnn"])
    net = _net(eps=0.9, backbone="scale_mpnn")
    with_alpha = net(batch)
    assert float((net.last_alpha.scale - 1).abs().max()) > 0.05
    net.alpha.frozen = True
    assert _relative(with_alpha, net(batch)) < 1e-9


# -- editing ---------------------------------------------------------------------------------

def _functions_agree(names, mods, graphs_a, graphs_b):
    torch.manual_seed(5)
    for name, model, a, b in zip(names, mods, graphs_a, graphs_b, strict=True):
        assert_same_function(to_model(a, model), to_model(b, model), INPUTS[name]())


def test_edit_outputs_the_same_structure_with_new_parameter_values():
    batch, mods = _batch(["mlp", "cnn", "transformer"])
    out = _net(task="edit")(batch)
    assert out.edge_attr.shape == batch.edge_attr.shape
    for key in ("edge_index", "edge_type", "node_param", "edge_kshape"):
        assert torch.equal(out[key], batch[key])
    length = batch.edge_kshape.prod(-1)
    padding = torch.arange(batch.edge_attr.size(1))[None] >= length[:, None]
    assert torch.equal(out.edge_attr[padding], batch.edge_attr[padding])
    structural = batch.edge_param < 0
    assert torch.equal(out.edge_attr[structural], batch.edge_attr[structural])
    assert not torch.allclose(out.edge_attr, batch.edge_attr)
    for model, graph in zip(mods, out.to_data_list(), strict=True):
        to_model(graph, model)  # converts back


@pytest.mark.parametrize("backbone,kinds,names", [
    ("mpnn", ["permutation", "head_permutation"], ["mlp", "cnn", "transformer"]),
    ("scale_mpnn", ["permutation", "head_permutation", "scale"], ["mlp", "cnn", "transformer"]),
])
def test_edited_networks_compute_the_same_function_for_equivalent_inputs(backbone, kinds, names):
    """Quasi-equivariance through to_model: F(g·θ) and F(θ) are the same network up to a
    group element, for every declared kind, with a far-from-identity α (ε = 0.5)."""
    batch, mods = _batch(names)
    net = _net(eps=0.5, task="edit", backbone=backbone)
    assert net.equivariant_to == frozenset(kinds) and net.invariant_to == frozenset()
    base = net(batch).to_data_list()
    gen = _generator(7)
    for _ in range(2):
        moved = act(sample(batch, gen, kinds, scale_range=(0.1, 10.0)), batch)
        _functions_agree(names, mods, base, net(moved).to_data_list())


def test_scale_mpnn_edits_are_quasi_but_not_strictly_equivariant_to_scales():
    names = ["mlp", "cnn"]
    batch, _ = _batch(names)
    net = _net(eps=0.5, task="edit", backbone="scale_mpnn")
    element = sample(batch, _generator(2), ["scale"], scale_range=(0.1, 10.0))
    strict = act(element, net(batch))
    quasi = net(act(element, batch))
    assert _relative(quasi.edge_attr, strict.edge_attr) > 1e-3
    net.alpha.frozen = True  # without α the backbone is strictly equivariant
    assert _relative(net(act(element, batch)).edge_attr,
                     act(element, net(batch)).edge_attr) < 1e-9


def test_alpha_cancels_in_the_function_of_a_scale_equivariant_edit():
    names = ["mlp", "cnn"]
    batch, mods = _batch(names)
    net = _net(eps=0.9, task="edit", backbone="scale_mpnn")
    with_alpha = net(batch).to_data_list()
    net.alpha.frozen = True
    without = net(batch).to_data_list()
    assert not torch.allclose(with_alpha[0].edge_attr, without[0].edge_attr)
    _functions_agree(names, mods, with_alpha, without)


# -- baselines and bookkeeping ----------------------------------------------------------------

def test_baselines_and_parameter_counts():
    batch, mods = _batch(["transformer", "transformer"])
    graph = batch.to_data_list()[0]
    quasi = QuasiGNN(16, 2, kernel_width=1)
    plain = QuasiGNN(16, 2, kernel_width=1, quasi=False)
    frozen = QuasiGNN(16, 2, kernel_width=1, alpha="frozen")
    width = 16
    while count_parameters(QuasiGNN(width, 2, kernel_width=1, quasi=False)) < \
            count_parameters(quasi):
        width += 1
    large = QuasiGNN(width, 2, kernel_width=1, quasi=False)
    stat = StatNN(len(graph.params), hidden_dim=32)
    flat = FlatMLP(flat_parameters(batch).size(1), hidden_dim=32)
    counts = {name: count_parameters(m) for name, m in
              [("quasi", quasi), ("plain", plain), ("frozen", frozen), ("large", large),
               ("statnn", stat), ("flat_mlp", flat)]}
    print(counts)
    assert counts["plain"] < counts["quasi"] <= counts["large"]
    assert counts["frozen"] == counts["quasi"] - 3  # the three ε are not trained
    extra = (counts["quasi"] - counts["plain"]) / counts["plain"]
    assert 0 < extra < 0.5
    n_values = sum(math.prod(p["shape"]) for p in graph.params)
    assert flat_parameters(batch).shape == (2, n_values)
    for model in (quasi, plain, large, stat, flat):
        assert model(batch).shape == (2, 1)


def test_flat_mlp_refuses_mixed_architectures():
    batch, _ = _batch(["mlp", "cnn"])
    with pytest.raises(ValueError, match="same number of parameters"):
        FlatMLP(10)(batch)


@pytest.mark.parametrize("kwargs,message", [
    ({"task": "classify"}, "task must be one of"),
    ({"backbone": "gat"}, "backbone must be one of"),
    ({"alpha": "fixd"}, r"alpha must be one of \('learned', 'fixed', 'frozen'\)"),
    ({"eps_init": 1.0}, r"eps_init must lie in \(eps_min, eps_max\)"),
    ({"eps_init": 1.0, "alpha": "fixed"}, r"eps_init must lie in \[0, 1\)"),
    ({"eps_min": 0.5, "eps_max": 0.4}, r"need 0 <= eps_min < eps_max < 1"),
    ({"alpha_on": "output"}, "alpha_on must be 'input' or 'states'"),
    ({"alpha_after": 3, "alpha_on": "states"}, r"alpha_after must index a layer in \[0, 3\)"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuasiGNN(8, 3, **kwargs)


def test_kernels_wider_than_the_model_are_refused():
    batch, _ = _batch(["cnn"])
    with pytest.raises(ValueError, match=r"kernel vectors of width 9 .* kernel_width=4"):
        QuasiGNN(8, 2, kernel_width=4)(batch)


# -- the GL-invariant attention view ----------------------------------------------------------

def test_gl_invariant_view_holds_the_per_head_products():
    from neuralgraph_quasi.nn._gl_invariant import QK_PRODUCT, VO_PRODUCT

    (model,) = _models(["transformer"])
    view = gl_invariant_view(to_graph(model))
    attention = model.encoder[0].attention
    d_head = 4
    for code, expected in (
            (QK_PRODUCT, [attention.queries.weight[h * d_head:(h + 1) * d_head].T
                          @ attention.keys.weight[h * d_head:(h + 1) * d_head]
                          for h in range(2)]),
            (VO_PRODUCT, [(attention.out_projection.weight[:, h * d_head:(h + 1) * d_head]
                           @ attention.values.weight[h * d_head:(h + 1) * d_head]).T
                          for h in range(2)])):
        sel = view.edge_type == code
        src, dst = view.edge_index[:, sel]
        got = torch.zeros(8, 8, 2, dtype=torch.float64)  # [from unit, to unit, k-th head]
        seen = torch.zeros(8, 8, dtype=torch.long)
        for s, d, v in zip(view.node_unit[src].tolist(), view.node_unit[dst].tolist(),
                           view.edge_attr[sel, 0].tolist(), strict=True):
            got[s, d, seen[s, d]] = v
            seen[s, d] += 1
        assert bool((seen == 2).all())  # one edge per head for every pair of dimensions
        want = torch.stack(expected, dim=-1)
        assert torch.allclose(got.sort(-1).values, want.sort(-1).values, rtol=1e-12)
    raw = torch.isin(view.edge_type[:to_graph(model).num_edges], torch.arange(3, 7))
    assert float(view.edge_attr[:raw.numel()][raw].abs().max()) == 0.0


def test_gl_invariant_predictions_are_invariant_to_gl_and_the_raw_ones_are_not():
    batch, _ = _batch(["mlp", "transformer"])
    mha = to_graph(nn.MultiheadAttention(6, 3, kdim=4, vdim=5).double())
    batch = collate([*batch.to_data_list(), mha])
    net = _net(eps=0.5, gl_invariant=True)
    assert net.invariant_to == {"permutation", "head_permutation", "gl"}
    assert_invariant(net, batch, [*net.invariant_to, "reindex"], tol=INVARIANCE_TOL,
                     generator=_generator())
    raw = _net(eps=0.5)
    assert equivariance_error(raw, batch, ["gl"], output="invariant",
                              generator=_generator()) > 1e-6


def test_gl_invariant_view_is_refused_for_editing():
    with pytest.raises(ValueError, match="gl_invariant=True needs task='predict'"):
        QuasiGNN(8, 2, task="edit", gl_invariant=True)


def test_alpha_finds_heads_wherever_the_head_nodes_are_listed():
    """Regression: with a head node listed last, nodes outside every head must not be
    taken for members of that head."""
    from neuralgraph_quasi.graph._schema import NodeType
    from neuralgraph_quasi.symmetry import reindex

    batch, _ = _batch(["transformer"])
    heads = (batch.node_type == NodeType.HEAD).nonzero().view(-1)
    order = torch.cat([torch.tensor([i for i in range(batch.num_nodes)
                                     if i != int(heads[-1])]), heads[-1:]])
    moved = reindex(batch)[0]
    moved = moved.clone()
    for key in ("x", "node_type", "node_op", "node_layer", "node_perm", "node_unit", "node_head",
                "node_pos", "node_act", "node_param", "node_offset", "batch"):
        moved[key] = batch[key][order]
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(order.numel())
    moved.edge_index = new_id[batch.edge_index]
    for key in [k for k in batch.keys() if k.startswith("edge_") and k != "edge_index"]:
        moved[key] = batch[key]
    assert int(moved.node_type[-1]) == NodeType.HEAD
    net = _net(eps=0.5)
    net(moved)
    members = moved.node_head >= 0
    members &= moved.node_type != NodeType.HEAD
    assert bool((net.last_alpha.head_row[~members] == -1).all())
    assert torch.allclose(net(moved), net(batch), rtol=1e-12)
