"""What cannot be converted raises ConversionError with a message naming the culprit."""

from __future__ import annotations

import re

import pytest
import torch
from _helpers import build
from torch import nn
from torch_geometric.data import Batch

from neuralgraph_quasi import ConversionError, collate, models, to_graph, to_graphs, to_model


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_conversion_error_is_a_value_error():
    assert issubclass(ConversionError, ValueError)


def test_unsupported_module_in_nested_sequential():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.GroupNorm(1, 3)))
    with pytest.raises(ConversionError, match="supported") as info:
        to_graph(model)
    msg = str(info.value)
    assert "'1.1'" in msg
    assert "GroupNorm" in msg


@pytest.mark.parametrize("module", [nn.Conv3d(1, 2, 3), nn.RNN(3, 4), nn.MaxPool2d(2)],
                         ids=lambda m: type(m).__name__)
def test_unsupported_root_module_names_its_type(module):
    with pytest.raises(ConversionError, match=rf"<root>.*{type(module).__name__}.*supported"):
        to_graph(module)


def test_subclass_of_supported_module_is_rejected():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ConversionError, match=r"'0'.*MyLinear"):
        to_graph(nn.Sequential(MyLinear(2, 3)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nonfinite_weight_names_the_parameter(bad):
    model = _mlp()
    with torch.no_grad():
        model[0].weight[1, 2] = bad
    with pytest.raises(ConversionError, match=r"'0\.weight'.*NaN or Inf"):
        to_graph(model)


def test_nonfinite_bias_names_the_parameter():
    model = _mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(ConversionError, match=r"'2\.bias'"):
        to_graph(model)


def test_allow_nonfinite_converts_and_keeps_the_values():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
        model[2].bias[0] = float("inf")
    g = to_graph(model, allow_nonfinite=True)
    assert int(torch.isnan(g.edge_attr).sum()) == 1
    assert int(torch.isinf(g.x).sum()) == 1
    rebuilt = to_model(g, _mlp())
    assert torch.isnan(rebuilt[0].weight[1, 2])
    assert torch.isinf(rebuilt[2].bias[0])
    assert torch.equal(rebuilt[0].weight.isnan(), model[0].weight.isnan())


def test_to_graphs_nonfinite_names_the_model_and_parameter():
    states = [build(_mlp, seed=s).state_dict() for s in range(3)]
    states[2]["2.weight"][0, 0] = float("nan")
    with pytest.raises(ConversionError, match=r"model 2.*'2\.weight'"):
        to_graphs(_mlp(), states)
    graphs = to_graphs(_mlp(), states, allow_nonfinite=True)
    assert torch.isnan(graphs[2].edge_attr).any()
    assert not torch.isnan(graphs[1].edge_attr).any()


def test_to_model_with_different_widths_names_parameter_and_shapes():
    g = to_graph(_mlp())
    like = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ConversionError, match=re.escape("'0.weight'")) as info:
        to_model(g, like)
    msg = str(info.value)
    assert "(4, 3)" in msg and "(5, 3)" in msg


def test_to_model_with_missing_layer_names_the_parameter():
    g = to_graph(_mlp())
    like = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(ConversionError, match=r"'4\.weight'.*not in the graph"):
        to_model(g, like)
    with pytest.raises(ConversionError, match=r"'4\.weight'.*not in the template"):
        to_model(to_graph(like), _mlp())


def test_to_model_with_same_shapes_but_different_structure():
    # same parameter names and shapes, but 2 heads in the graph and 4 in the template
    g = to_graph(models.SelfAttention(8, 2))
    with pytest.raises(ConversionError, match="structure"):
        to_model(g, models.SelfAttention(8, 4))


@pytest.mark.parametrize("flag", ["add_bias_kv", "add_zero_attn"])
def test_mha_extra_tokens_raise_naming_the_flag(flag):
    with pytest.raises(ConversionError, match=rf"{flag}=True.*not supported"):
        to_graph(nn.MultiheadAttention(8, 2, **{flag: True}))


def test_mha_flag_inside_encoder_layer_names_the_path():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    layer.self_attn = nn.MultiheadAttention(8, 2, add_zero_attn=True)
    with pytest.raises(ConversionError, match=r"'self_attn'.*add_zero_attn"):
        to_graph(layer)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3, groups=4)],
                         ids=["conv2d-groups-2", "conv1d-depthwise"])
def test_grouped_conv_raises(conv):
    with pytest.raises(ConversionError, match=r"'1'.*grouped.*not supported"):
        to_graph(nn.Sequential(nn.Conv2d(1, 4, 1) if isinstance(conv, nn.Conv2d)
                               else nn.Conv1d(1, 4, 1), conv))


def test_linear_width_mismatch_names_the_module():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(4, 5)))
    with pytest.raises(ConversionError, match=r"'2\.0'.*expects 4.*gives 3"):
        to_graph(model)


def test_conv_channel_mismatch_names_the_module():
    with pytest.raises(ConversionError, match=r"'1'.*expects 3 input channels.*gives 2"):
        to_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(3, 4, 3)))


def test_linear_after_conv_without_flatten():
    with pytest.raises(ConversionError, match=r"'2'.*Flatten"):
        to_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2, 3)))


def test_flatten_linear_width_not_matching_pool():
    with pytest.raises(ConversionError, match=r"'3'.*in_features=6"):
        to_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                               nn.Linear(6, 3)))


def test_two_activations_in_a_row():
    with pytest.raises(ConversionError, match=r"'2'.*second activation"):
        to_graph(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Tanh(), nn.Linear(3, 1)))


def test_empty_model():
    with pytest.raises(ConversionError, match="no layer"):
        to_graph(nn.Sequential())


def test_not_a_module():
    with pytest.raises(ConversionError, match="nn.Module"):
        to_graph({"weight": torch.zeros(2, 2)})


def _states(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [build(_mlp, seed=s).state_dict() for s in range(n)]


def test_to_graphs_missing_key_in_list():
    states = _states()
    del states[1]["2.bias"]
    with pytest.raises(ConversionError, match=r"state 1.*missing key '2\.bias'"):
        to_graphs(_mlp(), states)


def test_to_graphs_missing_key_in_stacked_dict():
    stacked = {k: torch.stack([s[k] for s in _states()]) for k in _states(1)[0]}
    del stacked["0.weight"]
    with pytest.raises(ConversionError, match=r"missing key '0\.weight'"):
        to_graphs(_mlp(), stacked)


def test_to_graphs_unknown_key_in_stacked_dict():
    stacked = {k: torch.stack([s[k] for s in _states()]) for k in _states(1)[0]}
    stacked["3.weight"] = torch.zeros(3, 2, 2)
    with pytest.raises(ConversionError, match=r"unknown key '3\.weight'"):
        to_graphs(_mlp(), stacked)


@pytest.mark.parametrize("where", [0, 2], ids=["first-state", "last-state"])
def test_to_graphs_unknown_key_in_list(where):
    states = _states()
    states[where]["head.weight"] = torch.zeros(2, 2)
    with pytest.raises(ConversionError, match=r"unknown key 'head\.weight'"):
        to_graphs(_mlp(), states)


def test_to_graphs_wrong_shape_in_stacked_dict_names_the_key():
    stacked = {k: torch.stack([s[k] for s in _states()]) for k in _states(1)[0]}
    stacked["0.bias"] = torch.zeros(3, 5)
    with pytest.raises(ConversionError, match=re.escape("'0.bias': shape [5] per model")):
        to_graphs(_mlp(), stacked)


def test_to_graphs_wrong_shape_in_list_names_the_key():
    states = _states()
    states[1]["0.weight"] = torch.zeros(5, 3)  # differs from the other states' [4, 3]
    with pytest.raises(ConversionError, match=r"'0\.weight'"):
        to_graphs(_mlp(), states)


@pytest.mark.parametrize("batcher", [collate, Batch.from_data_list],
                         ids=["collate", "from_data_list"])
def test_to_model_on_a_batch(batcher):
    batch = batcher([to_graph(_mlp()), to_graph(_mlp())])
    with pytest.raises(ConversionError, match="to_data_list"):
        to_model(batch, _mlp())


def test_params_of_a_batch_raise():
    batch = collate([to_graph(_mlp()), to_graph(models.siren())])
    with pytest.raises(TypeError, match="to_data_list"):
        _ = batch.params
