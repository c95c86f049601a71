"""Any module to a graph by torch.fx tracing: exact round trips, symmetries, controls, errors.

Every model is float64 with random values (BatchNorm in eval mode), so a symmetry must
preserve the function to a relative error below 1e-9.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from _fx_models import (
    Attention,
    Branches,
    FlattenCNN,
    FunctionalMLP,
    ResNet,
    Siren,
    TextClassifier,
)
from _helpers import assert_state_equal, randomize
from torch import nn

from neuralgraph_quasi import ConversionError, models, to_graph, to_model
from neuralgraph_quasi.graph import Act, EdgeType, NodeType
from neuralgraph_quasi.symmetry import GroupElement, act, sample, scalable_nodes
from neuralgraph_quasi.testing import assert_same_function

torch.set_num_threads(1)

ALL = ("permutation", "scale", "sign", "head_permutation", "gl")


def _build(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize(factory().double(), seed).eval()
    with torch.no_grad():  # variances well away from 0, so BatchNorm's eps matters little
        for name, t in model.named_buffers():
            if name.endswith("running_var"):
                t.add_(0.4)
    return model


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, 11, shape, generator=torch.Generator().manual_seed(1))


# (id, factory, input, example_input given to to_graph?)
FAMILIES = [
    ("siren", Siren, _x(16, 2), False),
    ("resnet-k3-identity", partial(ResNet, ((4, 1),), 3), _x(2, 2, 7, 7), False),
    ("resnet-k5-projection", partial(ResNet, ((4, 1), (6, 2)), 5, pool="adaptive"),
     _x(2, 2, 9, 9), False),
    ("resnet-k7-8convs", partial(ResNet, ((4, 1), (5, 2), (5, 1)), 7), _x(2, 2, 8, 8), True),
    ("flatten-cnn", FlattenCNN, _x(3, 1, 5, 5), True),
    ("flatten-cnn-no-example", FlattenCNN, _x(3, 1, 5, 5), False),
    ("text-torch-layers", partial(TextClassifier, block="torch"), _tokens(3, 5), False),
    ("text-sdpa", partial(TextClassifier, block="sdpa"), _tokens(3, 5), False),
    ("text-explicit", partial(TextClassifier, block="explicit"), _tokens(3, 6), False),
    ("branches-cat", Branches, _x(8, 3), False),
    ("functional-mlp", FunctionalMLP, _x(8, 3), False),
]
IDS = [f[0] for f in FAMILIES]


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request):
    name, factory, x, with_example = request.param
    model = _build(factory)
    example = x if with_example else None
    return name, model, x, example, to_graph(model, example_input=example)


def test_round_trip_is_exact(family):
    _, model, x, example, graph = family
    back = to_model(graph, model, example_input=example)
    assert_state_equal(model, back)
    assert_same_function(model, back, x, rtol=0.0)


def test_every_parameter_once(family):
    _, model, _, _, graph = family
    names = {p["name"] for p in graph.params}
    assert names == {n for n, _ in model.named_parameters()} | {
        n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("seed", range(3))
def test_sampled_symmetry_preserves_the_function(family, seed):
    _, model, x, example, graph = family
    element = sample(graph, torch.Generator().manual_seed(seed), kinds=ALL,
                     scale_range=(0.1, 10.0))
    moved = to_model(act(element, graph), model, example_input=example)
    assert_same_function(model, moved, x)
    assert not torch.equal(act(element, graph).edge_attr, graph.edge_attr)


@pytest.mark.parametrize("kind", ALL)
def test_each_kind_alone_preserves_the_function(family, kind):
    _, model, x, example, graph = family
    element = sample(graph, torch.Generator().manual_seed(7), kinds=[kind])
    assert_same_function(model, to_model(act(element, graph), model, example_input=example), x)


# -- structure ------------------------------------------------------------------------------
def test_siren_layers_are_sine_units_with_sign_flips_and_no_scales():
    model = _build(Siren)
    g = to_graph(model)
    hidden = g.node_type == NodeType.HIDDEN
    assert bool((g.node_act[hidden] == Act.SINE).all())
    assert not bool(scalable_nodes(g).any())
    element = sample(g, torch.Generator().manual_seed(0), kinds=["sign"])
    assert bool((element.scale[hidden] == -1).any())


def test_siren_graph_equals_the_zoo_siren_graph():
    ours = _build(Siren)
    zoo = models.siren(2, 8, 2, 1, w0=30.0).double()
    zoo.load_state_dict(_zoo_state(ours))
    assert_same_function(ours, zoo, _x(16, 2))
    a, b = to_graph(ours), to_graph(zoo)
    for key in ("edge_index", "edge_type", "node_type", "node_act", "node_perm", "x",
                "edge_attr"):
        assert torch.equal(a[key], b[key]), key


def _zoo_state(ours: Siren) -> dict:
    return {"0.weight": ours.net[0].linear.weight, "0.bias": ours.net[0].linear.bias,
            "2.weight": ours.net[1].linear.weight, "2.bias": ours.net[1].linear.bias,
            "4.weight": ours.last.weight, "4.bias": ours.last.bias}


def test_resnet_classes_couple_through_skips_and_batchnorm():
    model = _build(partial(ResNet, ((4, 1), (6, 2)), 3))
    g = to_graph(model)
    assert int((g.edge_type == EdgeType.RESIDUAL).sum()) == 4 + 6
    src, dst = g.edge_index[:, g.edge_type == EdgeType.RESIDUAL]
    assert torch.equal(g.node_perm[src], g.node_perm[dst])
    norm_src, norm_dst = g.edge_index[:, g.edge_type == EdgeType.NORM]
    assert torch.equal(g.node_perm[norm_src], g.node_perm[norm_dst])
    # residual streams and the convs feeding a BatchNorm take no scale; bn1 outputs do
    scal = scalable_nodes(g)
    assert not bool(scal[src].any()) and not bool(scal[dst].any())
    assert not bool(scal[norm_src].any())
    assert int(scal.sum()) == 4 + 6  # bn1 of each block: ReLU, then only conv2 reads it


def test_flatten_edges_hold_the_spatial_block_in_pytorch_order():
    model = _build(FlattenCNN)
    with_shape = to_graph(model, example_input=_x(1, 1, 5, 5))
    without = to_graph(model)
    lin = with_shape.edge_type == EdgeType.LINEAR
    kshape = with_shape.edge_kshape[lin & (with_shape.edge_param == 2)]
    assert kshape.tolist() == [[3, 3]] * 15
    assert without.edge_kshape[lin & (without.edge_param == 2)].tolist() == [[1, 9]] * 15
    src, dst = with_shape.edge_index[:, lin & (with_shape.edge_param == 2)]
    o, c = with_shape.node_unit[dst], with_shape.node_unit[src]
    expected = model.fc1.weight.detach().view(5, 3, 9)[o, c]
    assert torch.equal(with_shape.edge_attr[lin & (with_shape.edge_param == 2), :9], expected)


def test_learned_positions_are_embedding_edges_from_position_inputs():
    model = _build(partial(TextClassifier, block="sdpa", max_len=6))
    g = to_graph(model)
    pid = [p["name"] for p in g.params].index("pos")
    sel = g.edge_param == pid
    assert int(sel.sum()) == 6 * 8
    assert bool((g.edge_type[sel] == EdgeType.EMBEDDING).all())
    src, dst = g.edge_index[:, sel]
    assert bool((g.node_type[src] == NodeType.INPUT).all())
    assert torch.equal(g.edge_attr[sel, 0],
                       model.pos.detach()[0, g.node_unit[src], g.node_unit[dst]])


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_hand_written_attention_gives_the_self_attention_graph(explicit):
    ours = _build(partial(Attention, 8, 2, explicit, False))
    zoo = models.SelfAttention(8, 2).double()
    zoo.load_state_dict({f"{z}.weight": getattr(ours, o).weight for z, o in
                         (("queries", "q"), ("keys", "k"), ("values", "v"),
                          ("out_projection", "o"))})
    x = _x(3, 5, 8)
    assert_same_function(zoo, ours, x)
    a, b = to_graph(ours, example_input=x), to_graph(zoo)
    for key in ("edge_index", "edge_type", "edge_role", "edge_head", "edge_pos", "node_type",
                "node_head", "node_pos", "node_perm", "x", "edge_attr"):
        assert torch.equal(a[key], b[key]), key


def test_text_classifier_has_heads_per_layer():
    g = to_graph(_build(partial(TextClassifier, block="explicit", depth=2, heads=2)))
    assert int((g.node_type == NodeType.HEAD).sum()) == 4
    assert int((g.edge_type == EdgeType.QK_PAIR).sum()) == 2 * 8
    for role_type in (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O):
        assert int((g.edge_type == role_type).sum()) == 2 * 64


def test_cat_branches_keep_separate_classes():
    g = to_graph(_build(Branches))
    hidden = g.node_type == NodeType.HIDDEN
    classes = g.node_perm[hidden]
    assert sorted(torch.unique(classes).tolist()) == [0, 1]
    assert torch.bincount(classes).tolist() == [4, 5]


# -- BatchNorm in eval mode: which scalings are exact ------------------------------------------
def _bn_pair(seed: int = 0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(2, 3, 3).double(), nn.BatchNorm2d(3, eps=1e-2).double()
    randomize(nn.Sequential(conv, bn), seed)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.05, 0.2, 1.0], dtype=torch.float64))
    return nn.Sequential(conv, bn).eval()


def test_batchnorm_absorbs_an_output_scale_in_gain_and_shift():
    model = _bn_pair()
    s = torch.tensor([0.2, 3.0, 7.0], dtype=torch.float64)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[1].weight.mul_(s)
        moved[1].bias.mul_(s)
    x = _x(2, 2, 6, 6)
    with torch.no_grad():
        assert_same_function(nn.Sequential(model, _Scale(s)), moved, x)


def test_batchnorm_input_scale_is_exact_only_through_mean_and_gain():
    """Scaling BN's input by s: exact with μ → sμ, γ → γ/s (σ² unchanged); the naive rule
    μ → sμ, σ² → s²σ² is off by eps. The group action (per-node multipliers on bias and
    gain) expresses neither, so `sample` never scales units that feed a BatchNorm."""
    model = _bn_pair()
    s = torch.tensor([0.2, 3.0, 7.0], dtype=torch.float64)
    x = _x(2, 2, 6, 6)
    exact, naive = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for m in (exact, naive):
            m[0].weight.mul_(s[:, None, None, None])
            m[0].bias.mul_(s)
            m[1].running_mean.mul_(s)
        exact[1].weight.div_(s)
        naive[1].running_var.mul_(s ** 2)
    assert_same_function(model, exact, x)
    with torch.no_grad():
        a, b = model(x), naive(x)
    assert float((a - b).norm() / a.norm()) > 1e-3


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s[:, None, None]


# -- negative controls for the new couplings ---------------------------------------------------
def _identity(g) -> GroupElement:
    return GroupElement.identity(g.num_nodes)


def _block_model():
    return _build(partial(ResNet, ((4, 1),), 3))


def _permute_block(model: ResNet, perm: torch.Tensor, with_skip: bool) -> nn.Module:
    """Permute the channels of the block output (conv2/bn2 rows, fc columns); with
    ``with_skip`` also the skip stream (stem, bn, conv1 columns) as the coupling demands."""
    m = copy.deepcopy(model)
    block = m.layers[0]
    with torch.no_grad():
        block.conv2.weight.copy_(block.conv2.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn2, name).copy_(getattr(block.bn2, name)[perm])
        m.fc.weight.copy_(m.fc.weight[:, perm])
        if with_skip:
            m.stem.weight.copy_(m.stem.weight[perm])
            m.stem.bias.copy_(m.stem.bias[perm])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(m.bn, name).copy_(getattr(m.bn, name)[perm])
            block.conv1.weight.copy_(block.conv1.weight[:, perm])
    return m


def test_permuting_a_residual_block_without_its_skip_changes_the_function():
    model, x = _block_model(), _x(2, 2, 7, 7)
    perm = torch.tensor([1, 0, 3, 2])
    assert_same_function(model, _permute_block(model, perm, with_skip=True), x)
    with torch.no_grad():
        a, b = model(x), _permute_block(model, perm, with_skip=False)(x)
    assert float((a - b).norm() / a.norm()) > 1e-3
    # and the graph says so: stem, bn, bn2 and the block output are one class
    g = to_graph(model)
    stem_class = g.node_perm[g.edge_index[1, g.edge_param == 0]].unique()
    bn2_nodes = g.edge_index[1, g.edge_type == EdgeType.RESIDUAL]
    assert torch.equal(g.node_perm[bn2_nodes].unique(), stem_class)


def test_scaling_units_on_a_residual_stream_changes_the_function():
    model, x = _build(FunctionalMLP), _x(8, 3)
    g = to_graph(model)
    element = _identity(g)
    scale = element.scale.clone()
    scale[g.edge_index[1, g.edge_type == EdgeType.RESIDUAL]] = 2.0
    bad = GroupElement(element.perm, scale, element.heads, element.M, element.N)
    with torch.no_grad():
        a, b = model(x), to_model(act(bad, g), model)(x)
    assert float((a - b).norm() / a.norm()) > 1e-3


def test_permuting_query_rows_without_keys_changes_the_function():
    model, x = _build(partial(Attention, 8, 2, True)), _x(3, 5, 8)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        perm = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])
        moved.q.weight.copy_(moved.q.weight[perm])
        moved.q.bias.copy_(moved.q.bias[perm])
        a, b = model(x), moved(x)
    assert float((a - b).norm() / a.norm()) > 1e-3
    # permuting both (inside a head) is a symmetry; the graph's QK_PAIR edges demand it
    with torch.no_grad():
        moved.k.weight.copy_(moved.k.weight[perm])
        moved.k.bias.copy_(moved.k.bias[perm])
    assert_same_function(model, moved, x)


def test_swapping_units_across_cat_branches_changes_the_function():
    model, x = _build(Branches), _x(8, 3)
    moved = copy.deepcopy(model)
    with torch.no_grad():  # swap unit 0 of branch a (ReLU) with unit 0 of branch b (tanh)
        wa, ba = moved.a.weight[0].clone(), moved.a.bias[0].clone()
        moved.a.weight[0], moved.a.bias[0] = moved.b.weight[0], moved.b.bias[0]
        moved.b.weight[0], moved.b.bias[0] = wa, ba
        cols = moved.c.weight[:, [0, 4]].clone()
        moved.c.weight[:, [4, 0]] = cols
        a, b = model(x), moved(x)
    assert float((a - b).norm() / a.norm()) > 1e-3


# -- errors ------------------------------------------------------------------------------------
class _Exp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.exp(self.a(x)))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Exp()

    def forward(self, x):
        return self.inner(x)


class _ReadThenActivate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        return y + self.c(F.relu(h))


class _ScaleBeforeRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.relu(2.0 * self.a(x)))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(F.relu(self.a(x)))


class _Masked(Attention):
    """A mask per head: permuting heads would move it, so the symmetries do not hold."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.register_buffer("mask", torch.rand(heads, 5, 5) > 0.5)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (getattr(self, n)(x).view(b, t, self.heads, -1).transpose(1, 2) for n in "qkv")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class _StridedHeads(Attention):
    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (getattr(self, n)(x).view(b, t, -1, self.heads).permute(0, 3, 1, 2)
                   for n in "qkv")
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.permute(0, 2, 3, 1).reshape(b, t, d))


class _CatTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cat([h, h], dim=0))


class _GroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.norm(self.conv(x)).mean((2, 3))


class _Control(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


@pytest.mark.parametrize("factory, pattern", [
    (_Exp, r"fx node 'exp' \(op call_function, target torch\.exp\) in module <root> \(_Exp\)"),
    (_Outer, r"fx node 'exp' \(op call_function, target torch\.exp\) in module 'inner' \(_Exp\)"),
    (_ReadThenActivate, r"fx node 'relu' \(op call_function, target torch\.nn\.functional\.relu"
                        r"\).*read by another operation before the relu activation"),
    (_ScaleBeforeRelu, r"fx node 'relu'.*constant factor before relu"),
    (_Twice, r"fx node 'a_1' \(op call_module, target a\) in module 'a' \(Linear\).*second "
             "time"),
    (partial(_Masked, 8, 2), r"scaled_dot_product_attention.*in module <root> \(_Masked\): "
                             r"buffer 'mask' of shape \(2, 5, 5\) used as an attention mask"),
    (partial(_StridedHeads, 8, 2), r"fx node 'scaled_dot_product_attention'.*heads with axes"),
    (_CatTokens, r"fx node 'cat' \(op call_function, target torch\.cat\).*only along the "
                 "feature"),
    (_GroupNorm, r"fx node 'norm' \(op call_module, target norm\) in module 'norm' "
                 r"\(GroupNorm\): unsupported module 'norm' of type GroupNorm"),
    (_Control, r"torch\.fx cannot trace _Control.*control flow"),
], ids=lambda v: getattr(v, "__name__", None) or getattr(getattr(v, "func", None), "__name__",
                                                          "pattern"))
def test_unsupported_patterns_raise_naming_node_op_target_and_module(factory, pattern):
    model = factory()
    x = _x(2, 5, 8).float() if isinstance(model, Attention) else None
    with pytest.raises(ConversionError, match=pattern):
        to_graph(model, example_input=x)


def test_unused_layer_is_reported():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(ConversionError, match=r"not represented.*spare\.weight"):
        to_graph(Unused())


def test_example_input_that_does_not_run_raises():
    with pytest.raises(ConversionError, match="example_input does not run through FlattenCNN"):
        to_graph(FlattenCNN(), example_input=torch.randn(2, 3, 5, 5))
