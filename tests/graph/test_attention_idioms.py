"""Attention as public model code writes it (``_attention_idioms``): fused q/k/v projections
cut by ``split``/``chunk``/``reshape``+``unbind``/indexing/``einops.rearrange``, shapes from
``x.size()``, causal masks by ``is_causal`` or a registered buffer. Each converts exactly,
its head permutations and per-head GL symmetries keep the function in float64, and a
half-applied symmetry (keys left as they were) does not.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from _attention_idioms import (
    Chunked,
    Einops,
    EinopsAttribute,
    FusedIndexed,
    FusedReshapeUnbind,
    FusedSplitMaskedBuffer,
    FusedSplitSDPA,
    TokenModel,
)
from _helpers import assert_state_equal, randomize
from torch import nn

from neuralgraph_quasi import ConversionError, models, to_graph, to_model
from neuralgraph_quasi.graph import EdgeType, NodeType
from neuralgraph_quasi.symmetry import act, sample
from neuralgraph_quasi.testing import assert_same_function

torch.set_num_threads(1)

KINDS = ["head_permutation", "gl"]
IDIOMS = {
    "split-sdpa-causal": FusedSplitSDPA,
    "split-masked-float-buffer": FusedSplitMaskedBuffer,
    "reshape-unbind": FusedReshapeUnbind,
    "indexed-bool-buffer": FusedIndexed,
    "chunk": Chunked,
    "einops-chunk": Einops,
    "einops-fused": partial(Einops, fused_pattern=True),
    "einops-attribute": EinopsAttribute,
}


def _build(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(factory().double(), seed).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))


def _features(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _cases():
    for name, attn in IDIOMS.items():
        # in a token model (embedding in) and alone (its input is the token sequence,
        # which example_input says)
        yield pytest.param((partial(TokenModel, attn), _tokens(), False), id=f"{name}-model")
        yield pytest.param((partial(attn, 8, 2), _features(2, 5, 8), True), id=f"{name}-alone")


@pytest.fixture(scope="module", params=list(_cases()))
def case(request):
    factory, x, with_example = request.param
    model = _build(factory)
    example = x if with_example else None
    return model, x, example, to_graph(model, example_input=example)


def test_round_trip_is_exact(case):
    model, x, example, graph = case
    back = to_model(graph, model, example_input=example)
    assert_state_equal(model, back)
    assert_same_function(model, back, x, rtol=0.0)


def test_heads_and_projections_are_those_of_the_attention(case):
    model, _, _, graph = case
    depth = len(model.attn) if isinstance(model, TokenModel) else 1
    assert int((graph.node_type == NodeType.HEAD).sum()) == 2 * depth
    for role in (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O):
        assert int((graph.edge_type == role).sum()) == 64 * depth
    assert int((graph.edge_type == EdgeType.QK_PAIR).sum()) == 8 * depth


@pytest.mark.parametrize("seed", range(2))
def test_head_permutations_and_gl_keep_the_function(case, seed):
    model, x, example, graph = case
    element = sample(graph, torch.Generator().manual_seed(seed), kinds=KINDS)
    moved = act(element, graph)
    assert not torch.equal(moved.edge_attr, graph.edge_attr)
    assert_same_function(model, to_model(moved, model, example_input=example), x)


def test_negative_control_keys_left_unmoved_change_the_function(case):
    model, x, example, graph = case
    element = sample(graph, torch.Generator().manual_seed(5), kinds=KINDS)
    half = act(element, graph)
    keys = graph.edge_type == EdgeType.ATTN_K
    half.edge_attr = torch.where(keys[:, None], graph.edge_attr, half.edge_attr)
    with torch.no_grad():
        a = model(x)
        b = to_model(half, model, example_input=example)(x)
    assert float((a - b).norm() / a.norm()) > 1e-3


def _as_self_attention(fused: nn.Module) -> models.SelfAttention:
    """``models.SelfAttention`` holding the same weights as a fused q/k/v module."""
    zoo = models.SelfAttention(8, 2, bias=True).double()
    w, bias = fused.qkv.weight.detach(), fused.qkv.bias.detach()
    state = {}
    for i, name in enumerate(("queries", "keys", "values")):
        state[f"{name}.weight"] = w[8 * i:8 * (i + 1)]
        state[f"{name}.bias"] = bias[8 * i:8 * (i + 1)]
    state["out_projection.weight"] = fused.out.weight.detach()
    state["out_projection.bias"] = fused.out.bias.detach()
    zoo.load_state_dict(state)
    return zoo


def test_fused_split_gives_the_graph_of_separate_projections():
    """Non-causal ``split`` attention computes models.SelfAttention, and its graph is that
    of SelfAttention: the same nodes, edges and values, only the parameter ids differ."""
    fused = _build(partial(FusedSplitSDPA, 8, 2, causal=False))
    zoo = _as_self_attention(fused)
    x = _features(3, 5, 8)
    assert_same_function(zoo, fused, x)
    a, b = to_graph(fused, example_input=x), to_graph(zoo)
    for key in ("edge_index", "edge_type", "edge_role", "edge_head", "edge_pos", "node_type",
                "node_head", "node_pos", "node_perm", "x", "edge_attr"):
        assert torch.equal(a[key], b[key]), key


def test_causal_mask_is_live_and_recorded():
    """The causal flag changes the function (so the tests above test it), the graph records
    it, and a template module masked differently is refused."""
    causal = _build(partial(FusedSplitSDPA, 8, 2, causal=True))
    plain = copy.deepcopy(causal)
    plain.causal = False
    x = _features(3, 5, 8)
    with torch.no_grad():
        a, b = causal(x), plain(x)
    assert float((a - b).norm() / a.norm()) > 1e-3
    graph = to_graph(causal, example_input=x)
    assert graph._spec()["attention_masks"] == {"<root>": "causal"}
    with pytest.raises(ConversionError, match=r"attention '<root>' is masked differently: "
                                              r"the graph has causal, the template module "
                                              r"no mask"):
        to_model(graph, plain, example_input=x)


def test_buffer_masks_are_recorded_by_name():
    model = _build(partial(TokenModel, FusedSplitMaskedBuffer, depth=1))
    assert to_graph(model)._spec()["attention_masks"] == {"attn.0": "buffer attn.0.tril"}
    alone = _build(partial(FusedIndexed, 8, 2))
    assert to_graph(alone, example_input=_features(2, 5, 8))._spec()["attention_masks"] == {
        "<root>": "buffer allowed"}


def test_unmasked_graphs_keep_their_spec():
    spec = to_graph(_build(partial(TokenModel, Chunked)))._spec()
    assert "attention_masks" not in spec


# -- sizes read from the model input without example_input -------------------------------------
@pytest.mark.parametrize("attn", [FusedSplitSDPA, FusedSplitMaskedBuffer, FusedReshapeUnbind,
                                  FusedIndexed, Chunked], ids=lambda a: a.__name__)
def test_unpacked_input_shape_gives_tokens_and_widths_without_example_input(attn):
    """``b, t, c = x.size()`` says the input is a token sequence, and ``c // heads`` is
    solved once the projection has read the input: the graph is the one that
    example_input gives."""
    model = _build(partial(attn, 8, 2))
    x = _features(2, 5, 8)
    a, b = to_graph(model), to_graph(model, example_input=x)
    for key in ("edge_index", "edge_type", "edge_attr", "node_type", "node_perm", "x"):
        assert torch.equal(a[key], b[key]), key
    assert_same_function(model, to_model(a, model), x, rtol=0.0)


def test_sqrt_of_a_width_read_from_the_input_shape():
    from _fx_models import Attention

    model = _build(partial(Attention, 8, 2, True))  # math.sqrt(d // heads), d from x.shape
    x = _features(3, 5, 8)
    graph = to_graph(model)
    element = sample(graph, torch.Generator().manual_seed(0), kinds=KINDS)
    assert_same_function(model, to_model(act(element, graph), model), x)


def test_rearrange_of_an_input_of_unknown_rank_asks_for_example_input():
    with pytest.raises(ConversionError, match=r"fx node 'rearrange'.*without a token axis "
                                              r"\(for a model whose input is the token "
                                              r"sequence, pass example_input\)"):
        to_graph(Einops(8, 2))


# -- what is still refused, with the fx node and what would be needed --------------------------
class _Gated(nn.Module):
    """A GLU: the two halves of one Linear output used as tensors, not as q/k/v."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(3, 2)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.out(a * torch.sigmoid(b))


class _FourPieces(FusedSplitSDPA):
    """A fused projection one piece wider than q, k, v: the spare rows would be lost."""

    def __init__(self, width=8, heads=2):
        super().__init__(width, heads, causal=False)
        self.qkv = nn.Linear(width, 4 * width)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v, _ = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class _SplitTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        first, _ = self.fc(x).split(2, dim=1)
        return self.out(first)


class _Ellipsis(Chunked):
    def forward(self, x):
        q, k, v = (rearrange(z, "... n (h d) -> ... h n d", h=self.heads)
                   for z in self.to_qkv(x).chunk(3, dim=-1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(y, "b h n d -> b n (h d)"))


class _LearnedMask(FusedSplitMaskedBuffer):
    def __init__(self, width=8, heads=2):
        super().__init__(width, heads)
        self.tril = nn.Parameter(torch.ones(1, 1, 8, 8))


class _MaskedActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("keep", torch.ones(8, 8, dtype=torch.bool))

    def forward(self, x):
        return self.out(self.fc(x).masked_fill(~self.keep, 0.0))


def rearrange(*args, **kwargs):
    from einops import rearrange as real

    return real(*args, **kwargs)


@pytest.mark.parametrize("factory, shape, pattern", [
    (_Gated, (2, 5, 4),
     r"fx node 'sigmoid' \(op call_function, target torch\.sigmoid\) in module <root> "
     r"\(_Gated\): a piece of the split output of Linear 'fc' is used as a tensor.*"
     r"would need one graph stream per piece"),
    (_FourPieces, (2, 5, 8), r"fx node 'scaled_dot_product_attention'.*outputs of Linear 'qkv' "
                             r"\(width 32\) are not exactly q, k and v"),
    (_SplitTokens, (2, 5, 8), r"fx node 'split' \(op call_method, target split\).*split along "
                              r"dim 1 of a Linear output \('B', 'T', 'F'\): only along the "
                              r"feature axis"),
    (partial(_Ellipsis, 8, 2), (2, 5, 8), r"fx node 'rearrange'.*'\.\.\.' \(ellipsis, numbers "
                                          r"and anonymous axes\) is not supported; name every "
                                          r"axis"),
    (_LearnedMask, (2, 5, 8), r"fx node 'getitem_6'.*indexing parameter 'tril'.*only a prefix "
                              r"of its token axis"),
    (_MaskedActivations, (2, 8, 8), r"fx node 'masked_fill'.*masking a Linear output: only "
                                    r"attention scores may be masked"),
], ids=["glu", "four-pieces", "split-tokens", "einops-ellipsis", "learned-mask",
        "masked-activations"])
def test_unsupported_idioms_name_the_node_and_what_is_needed(factory, shape, pattern):
    with pytest.raises(ConversionError, match=pattern):
        to_graph(factory(), example_input=torch.randn(*shape))
