"""Shared models and checks for the symmetry tests (imported as a plain module).

Every model is built in float64 with seeded random values, in eval mode, so that
symmetry checks can demand a relative error below 1e-9.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from neuralgraph_quasi import models

KINDS = ("permutation", "scale", "sign", "head_permutation", "gl")

# The models here are tiny: intra-op threads only add synchronisation overhead (several
# times the work itself on a loaded 2-core machine), so the symmetry tests run on one.
torch.set_num_threads(1)


def randomize(model: nn.Module, seed: int, std: float = 0.5) -> nn.Module:
    """Overwrite every float parameter (and BatchNorm running statistics) with seeded
    random values, so that no default initialisation (LayerNorm ones, zero biases)
    hides a wrongly transformed value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(std * torch.randn(t.shape, generator=gen, dtype=torch.float64))
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(std * torch.randn(t.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=torch.float64))
    return model


class Call(nn.Module):
    """``m(q, k, v, need_weights=False)[0]``: an attention module as a plain function."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Tensor) -> Tensor:
        return self.module(*args, need_weights=False)[0]


@dataclass(frozen=True)
class Family:
    """A layer family: how to build it, draw inputs, call it, and which kinds apply."""

    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    kinds: frozenset[str]
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return randomize(self.factory().double(), seed).eval()


def randn(*shape: int) -> Callable[[torch.Generator], tuple]:
    return lambda gen: (torch.randn(*shape, generator=gen, dtype=torch.float64),)


def tokens(vocab: int, *shape: int) -> Callable[[torch.Generator], tuple]:
    return lambda gen: (torch.randint(0, vocab, shape, generator=gen),)


def mha_inputs(batch_first: bool, kdim: int = 8, vdim: int = 8):
    def make(gen: torch.Generator) -> tuple:
        def seq(t: int, d: int) -> Tensor:
            shape = (3, t, d) if batch_first else (t, 3, d)
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        return seq(5, 8), seq(4, kdim), seq(4, vdim)

    return make


def mlp(act: nn.Module, widths=(3, 6, 5, 2)) -> nn.Sequential:
    """Linear layers of the given widths with a fresh copy of ``act`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(copy.deepcopy(act))
    return nn.Sequential(*layers)


def encoder_layer(norm_first: bool, activation: str, batch_first: bool = True):
    return nn.TransformerEncoderLayer(8, 4, 12, dropout=0.0, activation=activation,
                                      batch_first=batch_first, norm_first=norm_first)


def encoder(norm_first: bool) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(encoder_layer(norm_first, "relu"), num_layers=2,
                                 norm=nn.LayerNorm(8), enable_nested_tensor=False)


def mha(bias: bool = True, kdim=None, vdim=None, batch_first: bool = True):
    return nn.MultiheadAttention(8, 4, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)


def cnn_pool() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


def transformer_classifier() -> models.TransformerClassifier:
    return models.TransformerClassifier(dim=8, depth=2, heads=4, hidden=12, num_classes=3)


P, S, G, H, GL = "permutation", "scale", "sign", "head_permutation", "gl"


def _f(*kinds: str) -> frozenset[str]:
    return frozenset(kinds)


FAMILIES: list[Family] = [
    *[Family(f"mlp-{name}", partial(mlp, act), randn(16, 3), kinds) for name, act, kinds in [
        ("relu", nn.ReLU(), _f(P, S)),
        ("leaky_relu", nn.LeakyReLU(0.1), _f(P, S)),
        ("tanh", nn.Tanh(), _f(P, G)),
        ("sigmoid", nn.Sigmoid(), _f(P)),
        ("gelu", nn.GELU(), _f(P)),
        ("silu", nn.SiLU(), _f(P)),
        ("identity", nn.Identity(), _f(P, S, G)),
        ("sine", models.Sine(3.0), _f(P, G)),
    ]],
    Family("mlp-nested-sequential",
           lambda: nn.Sequential(nn.Linear(3, 6), nn.Sequential(
               nn.Tanh(), nn.Linear(6, 5), nn.Sequential(nn.ReLU(), nn.Linear(5, 2)))),
           randn(16, 3), _f(P, S, G)),
    Family("mlp-no-bias",
           lambda: nn.Sequential(nn.Linear(3, 6, bias=False), nn.ReLU(), nn.Linear(6, 2)),
           randn(16, 3), _f(P, S)),
    # the affine LayerNorm's outputs absorb a scale in gain and shift; its inputs do not
    Family("mlp-layernorm-affine",
           lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2)),
           randn(16, 3), _f(P, S)),
    Family("mlp-layernorm-plain",
           lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6, elementwise_affine=False),
                                 nn.Tanh(), nn.Linear(6, 2)),
           randn(16, 3), _f(P)),
    *[Family(f"conv1d-k{k}", partial(lambda k: nn.Sequential(
        nn.Conv1d(2, 5, k), nn.ReLU(), nn.Conv1d(5, 3, k)), k), randn(3, 2, 12), _f(P, S))
      for k in (1, 3)],
    Family("conv1d-stride-pad-dil-nobias",
           lambda: nn.Sequential(nn.Conv1d(2, 5, 3, stride=2, padding=2, dilation=2, bias=False),
                                 nn.Tanh(), nn.Conv1d(5, 3, 2, padding=1)),
           randn(3, 2, 13), _f(P, G)),
    *[Family(f"conv2d-k{k}", partial(lambda k: nn.Sequential(
        nn.Conv2d(2, 5, k), nn.ReLU(), nn.Conv2d(5, 3, k)), k), randn(2, 2, 9, 9), _f(P, S))
      for k in (1, 3)],
    Family("conv2d-stride-pad-dil",
           lambda: nn.Sequential(nn.Conv2d(2, 5, (3, 2), stride=(2, 1), padding=1,
                                           dilation=(1, 2)),
                                 nn.LeakyReLU(0.2), nn.Conv2d(5, 3, 3, bias=False)),
           randn(2, 2, 11, 11), _f(P, S)),
    Family("cnn-avgpool2d", cnn_pool, randn(3, 2, 8, 8), _f(P, S)),
    Family("cnn-flatten-hw",
           lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5),
                                 nn.ReLU(), nn.Linear(5, 3)),
           randn(3, 1, 5, 5), _f(P, S)),
    Family("cnn-avgpool2d-2x3",
           lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 3)),
                                 nn.Flatten(), nn.Linear(24, 3)),
           randn(3, 1, 8, 8), _f(P, S)),
    Family("cnn-avgpool1d",
           lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(2),
                                 nn.Flatten(), nn.Linear(8, 3)),
           randn(3, 2, 10), _f(P, S)),
    Family("mha-packed", mha, mha_inputs(True), _f(H, GL), Call),
    Family("mha-packed-no-bias", partial(mha, False), mha_inputs(True), _f(H, GL), Call),
    Family("mha-seq-first", partial(mha, batch_first=False), mha_inputs(False), _f(H, GL), Call),
    Family("mha-kdim-vdim", partial(mha, True, 5, 3), mha_inputs(True, 5, 3), _f(H, GL), Call),
    Family("mha-kdim-vdim-no-bias", partial(mha, False, 5, 3), mha_inputs(True, 5, 3),
           _f(H, GL), Call),
    # post-norm: only the FFN's hidden units move (scaled through ReLU only); pre-norm: the
    # affine norm1/norm2 outputs feed Q/K/V and linear1, so they also take scales and signs
    *[Family(f"encoder-layer-post-{act}", partial(encoder_layer, False, act), randn(3, 5, 8),
             _f(P, H, GL) | (_f(S) if act == "relu" else _f())) for act in ("relu", "gelu")],
    *[Family(f"encoder-layer-pre-{act}", partial(encoder_layer, True, act), randn(3, 5, 8),
             _f(P, S, G, H, GL)) for act in ("relu", "gelu")],
    Family("encoder-layer-seq-first", partial(encoder_layer, False, "relu", False),
           randn(5, 3, 8), _f(P, S, H, GL)),
    Family("encoder-post-norm", partial(encoder, False), randn(3, 5, 8), _f(P, S, H, GL)),
    Family("encoder-pre-norm", partial(encoder, True), randn(3, 5, 8), _f(P, S, G, H, GL)),
    Family("batchnorm1d-mlp",
           lambda: nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)),
           randn(16, 3), _f(P, S)),
    Family("batchnorm2d-cnn",
           lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(),
                                 nn.Conv2d(4, 3, 3)),
           randn(3, 2, 7, 7), _f(P, G)),
    Family("batchnorm1d-conv1d-no-affine",
           lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, affine=False), nn.ReLU(),
                                 nn.Conv1d(4, 3, 3)),
           randn(3, 2, 10), _f(P)),
    Family("embedding-mlp",
           lambda: nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
           tokens(10, 3, 7), _f(P, S, G)),
    Family("self-attention", lambda: models.SelfAttention(8, 4), randn(3, 5, 8), _f(H, GL)),
    Family("self-attention-bias", lambda: models.SelfAttention(8, 2, bias=True), randn(3, 5, 8),
           _f(H, GL)),
    Family("transformer-block", lambda: models.TransformerBlock(8, 4, 12), randn(3, 5, 8),
           _f(P, S, H, GL)),
    Family("transformer-block-attn-bias",
           lambda: models.TransformerBlock(8, 4, 12, attention_bias=True), randn(3, 5, 8),
           _f(P, S, H, GL)),
    Family("transformer-classifier", transformer_classifier, randn(3, 5, 8), _f(P, S, H, GL)),
    Family("transformer-classifier-embedding",
           lambda: models.TransformerClassifier(dim=8, depth=1, heads=4, hidden=12, num_classes=3,
                                                embedding=nn.Embedding(10, 8)),
           tokens(10, 3, 5), _f(P, S, H, GL)),
    Family("siren", lambda: models.siren(2, 8, 2, 1, w0=30.0), randn(16, 2), _f(P, G)),
]

FAMILY_IDS = [f.name for f in FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def relative_error(a, b) -> float:
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return float((a - b).norm() / a.norm())


def outputs(model: nn.Module, inputs: tuple) -> Tensor:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return out[0] if isinstance(out, tuple) else out


def assert_graphs_close(a, b, atol: float = 1e-12) -> None:
    """Same structure; ``x`` and ``edge_attr`` equal within ``atol``."""
    assert a.x.shape == b.x.shape and a.edge_attr.shape == b.edge_attr.shape
    assert torch.equal(a.edge_index, b.edge_index)
    dx, de = max_abs_diff(a.x, b.x), max_abs_diff(a.edge_attr, b.edge_attr)
    assert dx <= atol, f"x differs by {dx:.3e}"
    assert de <= atol, f"edge_attr differs by {de:.3e}"


def assert_graphs_equal(a, b) -> None:
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.edge_attr, b.edge_attr)
    assert torch.equal(a.edge_index, b.edge_index)


#: Families of the mixed-architecture batches: MLPs, CNNs, attention with two different
#: head widths (d_head 2 and 4), a residual encoder layer, and a BatchNorm CNN.
BATCH_FAMILIES = ("mlp-relu", "cnn-avgpool2d", "transformer-classifier", "mlp-tanh",
                  "self-attention-bias", "encoder-layer-pre-relu", "batchnorm2d-cnn")


def mixed_batch(seed: int, names=BATCH_FAMILIES):
    """``(batch, graphs, models, families)`` for a collated batch of mixed architectures."""
    from neuralgraph_quasi import collate, to_graph

    fams = [BY_NAME[n] for n in names]
    built = [f.build(seed + i) for i, f in enumerate(fams)]
    graphs = [to_graph(m) for m in built]
    return collate(graphs), graphs, built, fams
