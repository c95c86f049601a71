"""StatNN reads the per-tensor statistics, is invariant to what it declares, and trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralgraph_quasi import collate, models, to_graph
from neuralgraph_quasi.nn import NUM_STATS, StatNN, tensor_statistics
from neuralgraph_quasi.testing import assert_invariant, equivariance_error


def _batch(factory, count: int = 3):
    torch.manual_seed(0)
    return collate([to_graph(factory().double()) for _ in range(count)])


def _transformer():
    return models.TransformerClassifier(dim=8, depth=1, heads=2, hidden=12, num_classes=3)


def _tanh_mlp():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def test_features_are_the_statistics_in_parameter_order():
    batch = _batch(_transformer)
    net = StatNN(num_tensors=len(batch.to_data_list()[0].params))
    feats = net.features(batch)
    assert feats.shape == (3, net.num_tensors * NUM_STATS)
    assert torch.equal(feats[1].view(-1, NUM_STATS),
                       tensor_statistics(batch.to_data_list()[1]).stats)


@pytest.mark.parametrize("factory", [_transformer, _tanh_mlp], ids=["transformer", "mlp"])
def test_predictions_are_invariant_to_the_declared_kinds(factory):
    batch = _batch(factory)
    net = StatNN(len(batch.to_data_list()[0].params), hidden_dim=16).eval()
    assert_invariant(net, batch, [*StatNN.invariant_to, "reindex"],
                     generator=torch.Generator().manual_seed(0))


def test_negative_control_sign_flips_change_the_prediction():
    batch = _batch(_tanh_mlp)
    net = StatNN(4, hidden_dim=16).eval()
    err = equivariance_error(net, batch, ["sign"], output="invariant",
                             generator=torch.Generator().manual_seed(0))
    assert err > 1e-3


def test_wrong_tensor_count_is_refused_with_the_counts():
    with pytest.raises(ValueError, match=r"expects 5 parameter tensors per graph.*\[4\]"):
        StatNN(5).features(_batch(_tanh_mlp))


def test_a_few_steps_fit_a_target_that_depends_on_the_statistics():
    torch.manual_seed(0)
    graphs = [to_graph(_tanh_mlp()) for _ in range(32)]
    batch = collate(graphs)
    target = torch.stack([g.edge_attr.abs().mean() for g in graphs])[:, None]
    net = StatNN(4, hidden_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = ((net(batch) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
