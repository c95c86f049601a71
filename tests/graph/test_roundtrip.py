"""Exact network -> graph -> network round trips, for every supported family."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from _helpers import assert_outputs_equal, assert_state_equal, build
from torch import nn

from neuralgraph_quasi import models, to_graph, to_model


def _randn(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape),)


def _tokens(vocab: int, *shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, vocab, shape),)


def _mlp(act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 4), act, nn.Linear(4, 2))


def _mha(batch_first: bool = True, bias: bool = True, kdim=None, vdim=None):
    return nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim)


def _mha_inputs(batch_first: bool = True, kdim: int = 8, vdim: int = 8) -> Callable[[], tuple]:
    def make() -> tuple:
        def seq(t: int, d: int) -> torch.Tensor:
            return torch.randn(2, t, d) if batch_first else torch.randn(t, 2, d)

        return seq(5, 8), seq(4, kdim), seq(4, vdim)

    return make


def _encoder_layer(norm_first: bool = False, activation: str = "relu",
                   batch_first: bool = True) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation=activation,
                                      batch_first=batch_first, norm_first=norm_first)


def _encoder(norm_first: bool) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(_encoder_layer(norm_first=norm_first), num_layers=2,
                                 norm=nn.LayerNorm(8), enable_nested_tensor=False)


def _conv2d_flatten() -> nn.Sequential:
    # 5x5 input, 3x3 kernel -> 2 channels of 3x3 = 18 features; each Linear edge holds 9 weights
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))


# (id, factory, input maker)
CASES = [
    *[(f"mlp-{name}", partial(_mlp, act), _randn(6, 3)) for name, act in [
        ("relu", nn.ReLU()), ("leaky_relu", nn.LeakyReLU(0.1)), ("tanh", nn.Tanh()),
        ("sigmoid", nn.Sigmoid()), ("gelu", nn.GELU()), ("silu", nn.SiLU()),
        ("identity", nn.Identity()), ("sine", models.Sine(3.0)),
    ]],
    ("mlp-nested-sequential",
     lambda: nn.Sequential(nn.Linear(3, 5), nn.Sequential(
         nn.Tanh(), nn.Linear(5, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))),
     _randn(6, 3)),
    ("mlp-dropout",
     lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)),
     _randn(6, 3)),
    ("mlp-no-bias",
     lambda: nn.Sequential(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 2)),
     _randn(6, 3)),
    ("mlp-layernorm",
     lambda: nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2)),
     _randn(6, 3)),
    ("mlp-batchnorm1d",
     lambda: nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)),
     _randn(6, 3)),
    ("conv1d-batchnorm1d",
     lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Conv1d(3, 2, 1)),
     _randn(2, 2, 9)),
    ("cnn-batchnorm2d",
     lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
     _randn(2, 1, 8, 8)),
    ("batchnorm2d-no-affine", lambda: nn.BatchNorm2d(3, affine=False), _randn(2, 3, 4, 4)),
    *[(f"conv1d-k{k}", partial(nn.Conv1d, 2, 3, k), _randn(2, 2, 9)) for k in (1, 3, 5)],
    ("conv1d-stride-pad-dil", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2),
     _randn(2, 2, 11)),
    ("conv1d-no-bias", lambda: nn.Conv1d(2, 3, 3, bias=False), _randn(2, 2, 9)),
    *[(f"conv2d-k{k}", partial(nn.Conv2d, 2, 3, k), _randn(2, 2, 9, 9)) for k in (1, 3, 5)],
    ("conv2d-k3x5", lambda: nn.Conv2d(2, 3, (3, 5)), _randn(2, 2, 9, 9)),
    ("conv2d-stride-pad-dil",
     lambda: nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=1, dilation=(1, 2)),
     _randn(2, 2, 11, 11)),
    ("conv2d-no-bias", lambda: nn.Conv2d(2, 3, 3, bias=False), _randn(2, 2, 9, 9)),
    ("conv2d-chain",
     lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, (3, 5), bias=False)),
     _randn(2, 1, 9, 9)),
    ("cnn-avgpool2d",
     lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)),
     _randn(2, 1, 8, 8)),
    ("cnn-avgpool2d-2x3",
     lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 3)),
                           nn.Flatten(), nn.Linear(24, 3)),
     _randn(2, 1, 8, 8)),
    ("cnn-avgpool1d",
     lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(2), nn.Flatten(),
                           nn.Linear(8, 3)),
     _randn(2, 2, 10)),
    ("cnn-flatten-no-pool", _conv2d_flatten, _randn(2, 1, 5, 5)),
    ("mha-batch-first", partial(_mha, True, True), _mha_inputs(True)),
    ("mha-seq-first", partial(_mha, False, True), _mha_inputs(False)),
    ("mha-no-bias", partial(_mha, True, False), _mha_inputs(True)),
    ("mha-kdim-vdim", partial(_mha, True, True, 5, 3), _mha_inputs(True, 5, 3)),
    ("mha-kdim-vdim-no-bias", partial(_mha, False, False, 5, 3), _mha_inputs(False, 5, 3)),
    *[(f"encoder-layer-{'pre' if nf else 'post'}-{act}-{'bf' if bf else 'sf'}",
       partial(_encoder_layer, nf, act, bf),
       _randn(2, 5, 8) if bf else _randn(5, 2, 8))
      for nf in (False, True) for act in ("relu", "gelu") for bf in (True, False)],
    ("encoder-post-norm", partial(_encoder, False), _randn(2, 5, 8)),
    ("encoder-pre-norm", partial(_encoder, True), _randn(2, 5, 8)),
    ("layernorm-affine", lambda: nn.LayerNorm(6), _randn(2, 3, 6)),
    ("layernorm-no-bias", lambda: nn.LayerNorm(6, bias=False), _randn(2, 3, 6)),
    ("layernorm-no-affine", lambda: nn.LayerNorm(6, elementwise_affine=False), _randn(2, 3, 6)),
    ("embedding", lambda: nn.Embedding(10, 4), _tokens(10, 2, 5)),
    ("self-attention", lambda: models.SelfAttention(8, 2), _randn(2, 5, 8)),
    ("self-attention-bias", lambda: models.SelfAttention(8, 4, bias=True), _randn(2, 5, 8)),
    ("self-attention-pool-head",
     lambda: nn.Sequential(models.SelfAttention(8, 2), models.MeanPool(), nn.Linear(8, 3)),
     _randn(2, 5, 8)),
    ("transformer-block", lambda: models.TransformerBlock(8, 2, 16), _randn(2, 5, 8)),
    ("transformer-block-attn-bias",
     lambda: models.TransformerBlock(8, 2, 16, attention_bias=True), _randn(2, 5, 8)),
    ("transformer-classifier",
     lambda: models.TransformerClassifier(dim=8, depth=2, heads=2, hidden=16, num_classes=3),
     _randn(2, 5, 8)),
    ("transformer-classifier-embedding",
     lambda: models.TransformerClassifier(dim=8, depth=1, heads=2, hidden=16, num_classes=3,
                                          embedding=nn.Embedding(10, 8)),
     _tokens(10, 2, 5)),
    ("siren", models.siren, _randn(7, 2)),
]


@pytest.mark.parametrize(("factory", "inputs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_roundtrip_exact(factory, inputs):
    model = build(factory, seed=0)
    like = build(factory, seed=1)
    # like's values must all differ from model's, so that copying them would be caught
    for key, value in model.state_dict().items():
        if torch.is_floating_point(value):
            assert not torch.equal(value, like.state_dict()[key]), key

    graph = to_graph(model)
    rebuilt = to_model(graph, like)

    assert type(rebuilt) is type(model)
    assert rebuilt is not like
    assert_state_equal(model, rebuilt)
    # like itself is left untouched
    assert_state_equal(like, build(factory, seed=1))

    rebuilt.eval()
    torch.manual_seed(7)
    x = inputs()
    with torch.no_grad():
        assert_outputs_equal(model(*x), rebuilt(*x))
        # and the template's values really would give a different function
        if model.state_dict():
            out_like = like(*x)
            out_like = out_like[0] if isinstance(out_like, tuple) else out_like
            out_model = model(*x)
            out_model = out_model[0] if isinstance(out_model, tuple) else out_model
            assert not torch.equal(out_model, out_like)


@pytest.mark.parametrize(("factory", "inputs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_graph_of_rebuilt_model_is_identical(factory, inputs):
    model = build(factory, seed=0)
    graph = to_graph(model)
    again = to_graph(to_model(graph, build(factory, seed=1)))
    assert graph.spec == again.spec
    for key, value in graph:
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key


def test_every_parameter_is_held_once_in_the_graph():
    """Every weight appears in exactly one edge or node slot (no duplicates, none lost)."""
    model = build(lambda: models.TransformerClassifier(8, 2, 2, 16, 3), seed=0)
    graph = to_graph(model)
    total = sum(p.numel() for p in model.parameters())
    weight_edges = graph.edge_param >= 0
    held_edges = int(graph.edge_kshape[weight_edges].prod(-1).sum())
    held_nodes = int((graph.node_param >= 0).sum())
    assert held_edges + held_nodes == total


def test_batchnorm_trained_state_round_trips():
    """Running statistics and the batch counter of a trained BatchNorm survive the round trip."""
    def factory():
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    torch.manual_seed(0)
    model = factory().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 6, 6))
    model.eval()
    assert int(model[1].num_batches_tracked) == 3
    like = build(factory, seed=1)
    assert_state_equal(model, to_model(to_graph(model), like))


# -- dtypes --------------------------------------------------------------------------------
def _small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2, 3))


@pytest.mark.parametrize("factory", [
    lambda: _mlp(nn.ReLU()), _small_cnn, lambda: models.TransformerBlock(8, 2, 16),
], ids=["mlp", "cnn", "transformer-block"])
def test_float64_model_gives_float64_graph_and_params(factory):
    model = build(factory, seed=0).double()
    graph = to_graph(model)
    assert graph.edge_attr.dtype == torch.float64
    assert graph.x.dtype == torch.float64
    rebuilt = to_model(graph, build(factory, seed=1))  # a float32 template
    for p in rebuilt.parameters():
        assert p.dtype == torch.float64
    assert_state_equal(model, rebuilt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_roundtrip(dtype):
    model = build(lambda: _mlp(nn.ReLU()), seed=0).to(dtype)
    graph = to_graph(model)
    assert graph.edge_attr.dtype == dtype and graph.x.dtype == dtype
    assert_state_equal(model, to_model(graph, build(lambda: _mlp(nn.ReLU()), seed=1)))


@pytest.mark.parametrize("factory", [
    lambda: _mlp(nn.ReLU()), _small_cnn, lambda: models.SelfAttention(8, 2, bias=True),
], ids=["mlp", "cnn", "self-attention"])
def test_float32_graph_cast_to_float64_gives_float64_params(factory):
    model = build(factory, seed=0)
    graph = to_graph(model)
    assert graph.edge_attr.dtype == torch.float32
    graph.edge_attr = graph.edge_attr.double()
    graph.x = graph.x.double()
    rebuilt = to_model(graph, build(factory, seed=1))
    expected = model.state_dict()
    got = rebuilt.state_dict()
    assert list(got) == list(expected)
    for key, value in got.items():
        assert value.dtype == torch.float64, key
        assert torch.equal(value, expected[key].double()), key
