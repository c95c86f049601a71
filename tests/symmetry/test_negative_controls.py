"""Negative controls: the sampled groups are not larger than they should be.

Each transformation below is close to a symmetry but is not one, and must CHANGE the
function (relative error > 1e-3, in float64). Each comes with its positive twin, built
by hand in PyTorch's ``[out, in]`` layout independently of the package's ``act``, which
must NOT change it (relative error < 1e-9): the controls are therefore sensitive, and
the conventions are checked against ground truth.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _sym_helpers import BY_NAME, Call, mlp, randomize
from torch import Tensor, nn

from neuralgraph_quasi import models, symmetry, to_graph
from neuralgraph_quasi.graph import EdgeType, NodeOp, NodeType, Slot
from neuralgraph_quasi.testing import assert_same_function

RTOL = 1e-9
CHANGED = 1e-3


def _same(a: nn.Module, b: nn.Module, x) -> None:
    assert_same_function(a, b, x, rtol=RTOL)


def _differs(a: nn.Module, b: nn.Module, x) -> None:
    with pytest.raises(AssertionError, match="different functions"):
        assert_same_function(a, b, x, rtol=CHANGED)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _well_conditioned(gen: torch.Generator, n: int) -> Tensor:
    """A random invertible, non-orthogonal, non-symmetric matrix."""
    while True:
        m = torch.eye(n, dtype=torch.float64) + 0.5 * _randn(gen, n, n)
        if float(torch.linalg.cond(m)) < 20:
            return m


# -- attention: projections in PyTorch layout, for both attention implementations ----------
def _self_attention(seed: int, heads: int = 2, bias: bool = True) -> models.SelfAttention:
    torch.manual_seed(seed)
    return randomize(models.SelfAttention(8, heads, bias=bias).double(), seed).eval()


def _mha(seed: int, heads: int = 2) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(8, heads, bias=True, batch_first=True).double()
    return randomize(m, seed).eval()


def _projections(m: nn.Module) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Views ``(weight, bias)`` of the Q, K, V, O projections in ``[out, in]`` layout."""
    if isinstance(m, models.SelfAttention):
        lins = {"q": m.queries, "k": m.keys, "v": m.values, "o": m.out_projection}
        return {k: (lin.weight, lin.bias) for k, lin in lins.items()}
    d = m.embed_dim
    w, b = m.in_proj_weight, m.in_proj_bias
    out = {k: (w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i, k in enumerate("qkv")}
    out["o"] = (m.out_proj.weight, m.out_proj.bias)
    return out


def _heads(m: nn.Module) -> int:
    return m.heads if isinstance(m, models.SelfAttention) else m.num_heads


def _attention_inputs(m: nn.Module, gen: torch.Generator) -> tuple:
    x = _randn(gen, 3, 6, 8)
    return (x,) if isinstance(m, models.SelfAttention) else (x, x, x)


def _wrap(m: nn.Module) -> nn.Module:
    return m if isinstance(m, models.SelfAttention) else Call(m)


def _manual_gl(m: nn.Module, M: list[Tensor], N: list[Tensor], parts: str = "qkvo",
               k_factor=lambda M: torch.linalg.inv(M).mT) -> nn.Module:
    """The documented GL action per head, written out on the module's own tensors:
    ``W_Q → M W_Q``, ``W_K → M⁻ᵀ W_K``, ``W_V → Nᵀ W_V``, ``W_O[:, h] → W_O[:, h] N⁻ᵀ``
    (biases like their rows), restricted to ``parts``."""
    m = copy.deepcopy(m)
    proj = _projections(m)
    dh = proj["q"][0].size(0) // _heads(m)
    with torch.no_grad():
        for h in range(_heads(m)):
            rows = slice(h * dh, (h + 1) * dh)
            factors = {"q": M[h], "k": k_factor(M[h]), "v": N[h].mT}
            for part, A in factors.items():
                if part in parts:
                    w, b = proj[part]
                    w[rows] = A @ w[rows]
                    if b is not None:
                        b[rows] = A @ b[rows]
            if "o" in parts:
                w = proj["o"][0]
                w[:, rows] = w[:, rows] @ torch.linalg.inv(N[h]).mT
    return m


def _permute_rows(m: nn.Module, head: int, order: Tensor, parts: str) -> nn.Module:
    """Permute the rows of one head's block of the projections in ``parts`` (``o``: columns)."""
    m = copy.deepcopy(m)
    proj = _projections(m)
    dh = proj["q"][0].size(0) // _heads(m)
    idx = head * dh + order
    rows = slice(head * dh, (head + 1) * dh)
    with torch.no_grad():
        for part in parts:
            w, b = proj[part]
            if part == "o":
                w[:, rows] = w[:, idx].clone()
            else:
                w[rows] = w[idx].clone()
                if b is not None:
                    b[rows] = b[idx].clone()
    return m


ATTENTION = {"self-attention": _self_attention, "mha-packed": _mha}


@pytest.mark.parametrize("make", ATTENTION.values(), ids=ATTENTION.keys())
def test_query_rows_of_one_head_permuted_without_keys_is_not_a_symmetry(make):
    gen = torch.Generator().manual_seed(1)
    for seed in range(2):
        m = make(seed, heads=2)
        x = _attention_inputs(m, gen)
        order = torch.tensor([1, 2, 3, 0])  # d_head = 4: a cyclic shift of the positions
        for head in range(2):
            # Q alone: the scores q·k pair the wrong coordinates
            _differs(_wrap(m), _wrap(_permute_rows(m, head, order, "q")), x)
            # V alone (without the matching O columns) is not one either
            _differs(_wrap(m), _wrap(_permute_rows(m, head, order, "v")), x)
            # positive twins: Q with K, and V with O's columns, are symmetries
            _same(_wrap(m), _wrap(_permute_rows(m, head, order, "qk")), x)
            _same(_wrap(m), _wrap(_permute_rows(m, head, order, "vo")), x)
            _same(_wrap(m), _wrap(_permute_rows(m, head, order, "qkvo")), x)


def test_query_rows_permuted_in_transformer_classifier_is_not_a_symmetry():
    fam = BY_NAME["transformer-classifier"]
    model = fam.build(seed=3)
    gen = torch.Generator().manual_seed(2)
    x = fam.inputs(gen)
    dh = 2  # dim 8, 4 heads
    for layer in range(2):
        for swap_keys, check in ((False, _differs), (True, _same)):
            other = copy.deepcopy(model)
            att = other.encoder[layer].attention
            with torch.no_grad():
                for lin in (att.queries, att.keys) if swap_keys else (att.queries,):
                    w = lin.weight
                    w[dh:2 * dh] = w[[dh + 1, dh]].clone()  # head 1: swap its two rows
            check(model, other, x)


@pytest.mark.parametrize("make", ATTENTION.values(), ids=ATTENTION.keys())
def test_whole_heads_permuted_in_q_and_k_but_not_v_and_o_is_not_a_symmetry(make):
    m = make(4, heads=2)
    gen = torch.Generator().manual_seed(3)
    x = _attention_inputs(m, gen)

    def swap_heads(parts: str) -> nn.Module:
        other = copy.deepcopy(m)
        proj = _projections(other)
        swap = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
        with torch.no_grad():
            for part in parts:
                w, b = proj[part]
                if part == "o":
                    w.copy_(w[:, swap].clone())
                else:
                    w.copy_(w[swap].clone())
                    if b is not None:
                        b.copy_(b[swap].clone())
        return other

    _differs(_wrap(m), _wrap(swap_heads("qk")), x)
    _same(_wrap(m), _wrap(swap_heads("qkvo")), x)


@pytest.mark.parametrize("make", ATTENTION.values(), ids=ATTENTION.keys())
def test_gl_factor_on_one_side_only_is_not_a_symmetry(make):
    gen = torch.Generator().manual_seed(5)
    for seed in range(2):
        m = make(seed, heads=2)
        x = _attention_inputs(m, gen)
        M = [_well_conditioned(gen, 4) for _ in range(2)]
        N = [_well_conditioned(gen, 4) for _ in range(2)]
        # ground truth: the documented pair, written by hand, is a symmetry
        _same(_wrap(m), _wrap(_manual_gl(m, M, N)), x)
        _same(_wrap(m), _wrap(_manual_gl(m, M, N, parts="qk")), x)
        _same(_wrap(m), _wrap(_manual_gl(m, M, N, parts="vo")), x)
        # M on Q alone, N on V alone, or K with M⁻¹ instead of M⁻ᵀ: not symmetries
        _differs(_wrap(m), _wrap(_manual_gl(m, M, N, parts="q")), x)
        _differs(_wrap(m), _wrap(_manual_gl(m, M, N, parts="k")), x)
        _differs(_wrap(m), _wrap(_manual_gl(m, M, N, parts="v")), x)
        _differs(_wrap(m), _wrap(_manual_gl(m, M, N, parts="qkvo",
                                            k_factor=torch.linalg.inv)), x)


def test_package_gl_matches_the_manual_formula_on_self_attention():
    """The package's action, with its own sampled M and N, equals the hand-written one."""
    m = _self_attention(7, heads=2, bias=True)
    graph = to_graph(m)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        e = symmetry.sample(graph, gen, kinds=["gl"])
        order = torch.argsort(graph.node_head[e.heads])  # rows of e.M by head index
        M, N = list(e.M[order]), list(e.N[order])
        ours = symmetry.act(e, m)
        manual = _manual_gl(m, M, N)
        for key, value in manual.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-13)


# -- scales and signs through activations -----------------------------------------------------
def _hidden_mlp(act: nn.Module, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return randomize(mlp(act, (3, 6, 2)).double(), seed).eval()


def _scale_unit(m: nn.Sequential, unit: int, s: float) -> nn.Sequential:
    """Incoming weights and bias of hidden ``unit`` times ``s``, outgoing divided by ``s``."""
    m = copy.deepcopy(m)
    with torch.no_grad():
        m[0].weight[unit] *= s
        m[0].bias[unit] *= s
        m[2].weight[:, unit] /= s
    return m


def _busy_unit(m: nn.Sequential) -> int:
    """The hidden unit with the largest outgoing weights (its change is seen downstream)."""
    return int(m[2].weight.abs().sum(0).argmax())


ACTS = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1), "tanh": nn.Tanh(),
        "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "silu": nn.SiLU(), "sine": models.Sine(2.0),
        "identity": nn.Identity()}
#: multipliers that are symmetries of a unit with this activation
ALLOWED = {"relu": (2.0, 3.0), "leaky_relu": (2.0, 3.0), "tanh": (-1.0,), "sine": (-1.0,),
           "identity": (2.0, -1.0, -2.0), "sigmoid": (), "gelu": (), "silu": ()}
#: multipliers that are not
FORBIDDEN = {"relu": (-2.0, -1.0), "leaky_relu": (-2.0, -1.0), "tanh": (3.0, -2.0),
             "sine": (3.0, -2.0), "identity": (), "sigmoid": (3.0, -1.0), "gelu": (3.0, -1.0),
             "silu": (3.0, -1.0)}


@pytest.mark.parametrize("name", ACTS)
def test_scales_and_signs_through_activations(name: str):
    gen = torch.Generator().manual_seed(8)
    for seed in range(2):
        m = _hidden_mlp(ACTS[name], seed)
        x = _randn(gen, 64, 3)
        unit = _busy_unit(m)
        for s in ALLOWED[name]:
            _same(m, _scale_unit(m, unit, s), x)
        for s in FORBIDDEN[name]:
            _differs(m, _scale_unit(m, unit, s), x)


@pytest.mark.parametrize("name", ACTS)
def test_sampled_multipliers_are_only_the_allowed_ones(name: str):
    """``scalable_nodes`` / ``sign_flippable_nodes`` agree with the ground truth above."""
    m = _hidden_mlp(ACTS[name], 0)
    graph = to_graph(m)
    hidden = graph.node_type == NodeType.HIDDEN
    scalable = symmetry.scalable_nodes(graph)
    flippable = symmetry.sign_flippable_nodes(graph)
    positive = any(s > 0 for s in ALLOWED[name])
    negative = any(s < 0 for s in ALLOWED[name])
    assert torch.equal(scalable, hidden if positive else torch.zeros_like(hidden))
    assert torch.equal(flippable, hidden if negative else torch.zeros_like(hidden))


@pytest.mark.parametrize("name", ["mlp-gelu", "mlp-silu", "mlp-sigmoid", "mlp-tanh", "mlp-sine"])
def test_no_scalable_units_without_positive_homogeneity(name: str):
    graph = to_graph(BY_NAME[name].build(0))
    assert not bool(symmetry.scalable_nodes(graph).any())


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-leaky_relu", "mlp-gelu", "mlp-silu",
                                  "mlp-sigmoid", "cnn-avgpool2d"])
def test_no_sign_flippable_units_without_an_odd_activation(name: str):
    graph = to_graph(BY_NAME[name].build(0))
    assert not bool(symmetry.sign_flippable_nodes(graph).any())


@pytest.mark.parametrize("name", ["mlp-layernorm-affine", "mlp-layernorm-plain",
                                  "transformer-block", "transformer-classifier",
                                  "encoder-layer-post-relu", "encoder-layer-pre-relu",
                                  "encoder-pre-norm", "batchnorm1d-mlp", "batchnorm2d-cnn",
                                  "batchnorm1d-conv1d-no-affine",
                                  "transformer-classifier-embedding"])
def test_units_feeding_a_norm_or_on_a_residual_stream_take_no_multiplier(name: str):
    graph = to_graph(BY_NAME[name].build(0))
    src, dst = graph.edge_index
    feeds_norm = torch.zeros(graph.num_nodes, dtype=torch.bool)
    feeds_norm[src[graph.edge_type == EdgeType.NORM]] = True
    on_residual = torch.zeros(graph.num_nodes, dtype=torch.bool)
    residual = graph.edge_type == EdgeType.RESIDUAL
    on_residual[src[residual]] = True
    on_residual[dst[residual]] = True
    fixed = graph.node_type != NodeType.HIDDEN  # inputs, outputs, Q/K/V and head nodes
    plain_norm = (torch.isin(graph.node_op, torch.tensor([int(NodeOp.LAYER_NORM),
                                                           int(NodeOp.BATCH_NORM)]))
                  & (graph.node_param[:, Slot.GAIN] < 0))  # a norm without gain cannot absorb one
    forbidden = feeds_norm | on_residual | fixed | plain_norm
    assert bool(feeds_norm.any())
    for mask in (symmetry.scalable_nodes(graph), symmetry.sign_flippable_nodes(graph)):
        assert not bool((mask & forbidden).any())


def test_scaling_units_that_feed_a_layernorm_is_not_exact():
    """Why units feeding a norm are excluded (ground truth on the module): one unit alone
    changes the statistics; all of them by one common ``s`` is exact only with eps = 0."""
    fam = BY_NAME["mlp-layernorm-affine"]
    model = fam.build(seed=1)
    gen = torch.Generator().manual_seed(9)
    x = fam.inputs(gen)
    one = copy.deepcopy(model)
    with torch.no_grad():
        one[0].weight[2] *= 3.0
        one[0].bias[2] *= 3.0
    _differs(model, one, x)
    every = copy.deepcopy(model)
    with torch.no_grad():
        every[0].weight *= 3.0
        every[0].bias *= 3.0
    with pytest.raises(AssertionError):  # off by LayerNorm's eps: above float64 tolerance
        assert_same_function(model, every, x, rtol=RTOL)
    without_eps, every_without_eps = copy.deepcopy(model), copy.deepcopy(every)
    without_eps[1].eps = every_without_eps[1].eps = 0.0
    _same(without_eps, every_without_eps, x)


def test_package_element_with_a_forbidden_multiplier_changes_the_function():
    """``act`` itself applies whatever it is given: the restriction lives in ``sample``."""
    fam = BY_NAME["mlp-gelu"]
    model = fam.build(seed=2)
    graph = to_graph(model)
    e = symmetry.identity(graph)
    hidden = (graph.node_type == NodeType.HIDDEN).nonzero().view(-1)
    scale = e.scale.clone()
    scale[hidden] = 3.0
    bad = symmetry.GroupElement(e.perm, scale, e.heads, e.M, e.N)
    gen = torch.Generator().manual_seed(10)
    _differs(model, symmetry.act(bad, model), fam.inputs(gen))
