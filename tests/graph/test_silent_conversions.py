"""No silent wrong conversions: tied weights are refused on every conversion path, and
``to_model`` refuses a template module whose activations differ from the graph's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import build
from torch import nn

from neuralgraph_quasi import ConversionError, to_graph, to_graphs, to_model
from neuralgraph_quasi.graph import StateStacker
from neuralgraph_quasi.symmetry import act, reindex, sample
from neuralgraph_quasi.testing import assert_same_function


class _TwoLayers(nn.Module):
    """Traced (not a Sequential): ``c(relu(b(relu(a(x)))))``."""

    def __init__(self, act=F.relu) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act = act

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def _tie_module_weights(model: _TwoLayers) -> _TwoLayers:
    model.b.weight = model.a.weight  # one Parameter, two modules
    return model


def _tie_by_view(model: _TwoLayers) -> _TwoLayers:
    model.b.weight = nn.Parameter(model.a.weight.detach().t())  # other object, same memory
    return model


class _TableIsEmbedding(nn.Module):
    """A parameter read by ``get_attr`` (a positional table) that is another layer's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.pos = self.embed.weight
        self.out = nn.Linear(4, 2)

    def forward(self, tokens):
        return self.out((self.embed(tokens) + self.pos).mean(1))


def _tied_sequential() -> nn.Sequential:
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    seq[2].weight = seq[0].weight
    return seq


def test_tied_traced_model_loses_its_function_without_the_check():
    """What the check prevents: the untied graph moves the two uses differently, and the
    moved values loaded back into the tied model compute another function."""
    tied = _tie_module_weights(build(lambda: _TwoLayers().double(), 0))
    untied = build(lambda: _TwoLayers().double(), 0)
    with torch.no_grad():
        untied.load_state_dict(tied.state_dict())
    g = to_graph(untied)
    moved = to_model(act(sample(g, torch.Generator().manual_seed(0), kinds=["permutation"]),
                         g), untied)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_same_function(untied, moved, x)  # fine while the weights are separate
    tied.load_state_dict(moved.state_dict())  # the later key wins for the shared tensor
    with torch.no_grad():
        a, b = untied(x), tied(x)
    assert float((a - b).norm() / a.norm()) > 1e-3


@pytest.mark.parametrize("make, pattern", [
    (lambda: _tie_module_weights(_TwoLayers()),
     r"fx node 'b' \(op call_module, target b\) in module 'b' \(Linear\): parameter "
     r"'b\.weight' shares its memory with 'a\.weight': shared \(tied\) weights"),
    (lambda: _tie_by_view(_TwoLayers()),
     r"fx node 'b' .*'b\.weight' shares its memory with 'a\.weight'"),
    (_TableIsEmbedding, r"fx node 'add' \(op call_function.*parameter 'pos' shares its memory "
                        r"with 'embed\.weight'"),
    (_tied_sequential, r"^parameter '2\.weight' shares its memory with '0\.weight': shared "
                       r"\(tied\) weights are not supported"),
], ids=["traced-same-parameter", "traced-view", "traced-get-attr", "sequential"])
def test_tied_weights_raise_on_every_path(make, pattern):
    model = make()
    with pytest.raises(ConversionError, match=pattern):
        to_graph(model)
    with pytest.raises(ConversionError, match="shares its memory"):
        to_graphs(model, [model.state_dict()])
    with pytest.raises(ConversionError, match="shares its memory"):
        StateStacker.for_model(model, capacity=1)


def test_separate_copies_of_one_value_still_convert():
    model = _TwoLayers().double()
    with torch.no_grad():
        model.b.weight = nn.Parameter(model.a.weight.detach().clone())
    back = to_model(to_graph(model), model)
    assert torch.equal(back.b.weight, model.a.weight)
    assert back.b.weight.data_ptr() != back.a.weight.data_ptr()


def _mlp(act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), act, nn.Linear(4, 2))


@pytest.mark.parametrize("other, what", [
    (nn.Tanh(), "tanh on 4"), (nn.Identity(), "none"), (nn.GELU(), "gelu on 4")],
    ids=["tanh", "identity", "gelu"])
def test_to_model_refuses_other_activations_naming_the_layer(other, what):
    graph = to_graph(_mlp(nn.ReLU()))
    with pytest.raises(ConversionError, match=(
            rf"^activations differ at layer 2 \(module '2', fed by '2\.weight'\): the graph "
            rf"has relu on 4, the template module {what} \(units per activation\)$")):
        to_model(graph, _mlp(other))


def test_to_model_refuses_other_activations_in_a_traced_model():
    graph = to_graph(_TwoLayers(F.relu))
    with pytest.raises(ConversionError, match=r"activations differ at layer 1 \(module 'a'.*"
                                              r"graph has relu on 4.*module tanh on 4"):
        to_model(graph, _TwoLayers(torch.tanh))


def test_same_activations_convert_back_from_a_reindexed_graph():
    model = build(lambda: _mlp(nn.Tanh()).double(), 3)
    shuffled, _, _ = reindex(to_graph(model), torch.Generator().manual_seed(0))
    back = to_model(shuffled, model)
    for (name, p), (_, q) in zip(model.named_parameters(), back.named_parameters(),
                                 strict=True):
        assert torch.equal(p, q), name
