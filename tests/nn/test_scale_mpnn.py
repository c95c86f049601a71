"""ScaleMPNN: states scale like weights and biases, the readout is invariant, and the
checks can fail (sign flips, scalings that are not symmetries, ScaleGMN's backward bug)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from neuralgraph_quasi import collate, models, to_graph
from neuralgraph_quasi.graph._schema import NodeType
from neuralgraph_quasi.nn._scale_mpnn import ScaleMessages, ScaleMPNN, canon
from neuralgraph_quasi.symmetry import act, identity, sample, scalable_nodes
from neuralgraph_quasi.symmetry._index import edge_map
from neuralgraph_quasi.testing import assert_invariant, equivariance_error

KINDS = ["permutation", "head_permutation", "scale"]
WIDE = (1e-2, 1e2)


def _relu_mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))


def _leaky_mlp():
    return nn.Sequential(nn.Linear(2, 6), nn.LeakyReLU(0.1), nn.Linear(6, 5), nn.LeakyReLU(0.1),
                         nn.Linear(5, 4))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _bn_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _transformer():
    return models.TransformerClassifier(dim=8, depth=1, heads=2, hidden=12, num_classes=3)


def _graph(factory):
    torch.manual_seed(0)
    model = factory()
    for module in model.modules():  # non-zero running statistics and biases
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    return to_graph(model.double())


def _mixed():
    return collate([_graph(_relu_mlp), _graph(_cnn), _graph(_transformer), _graph(_bn_cnn)])


GRAPHS = {"relu_mlp": _relu_mlp, "leaky_mlp": _leaky_mlp, "cnn": _cnn, "bn_cnn": _bn_cnn,
          "mixed": _mixed}


def _make(factory):
    return factory() if factory is _mixed else _graph(factory)


def _net(cls=ScaleMPNN, layers: int = 2, **kwargs):
    torch.manual_seed(1)
    return cls(hidden_dim=8, num_layers=layers, kernel_width=9, **kwargs).double().eval()


def _like_weights(element, graph, out):
    """Node states move with the node map and scale as ``d_j``; weight-edge states as
    ``d_j / d_i``; structural-edge states are invariant (as :func:`act` does to values)."""
    node, edge = out
    node, edge = node[element.perm], edge[edge_map(graph, element.perm)]
    d = element.scale.to(node.dtype)
    src, dst = graph.edge_index
    ratio = torch.where(graph.edge_param >= 0, d[dst] / d[src], torch.ones_like(d[dst]))
    return (node * d.reshape(-1, *[1] * (node.dim() - 1)),
            edge * ratio.reshape(-1, *[1] * (edge.dim() - 1)))


def _error(fn, graph, kinds, trials: int = 2, scale_range=WIDE) -> float:
    """:func:`equivariance_error` with states transforming like weights and biases."""
    return equivariance_error(fn, graph, kinds, output=_like_weights, trials=trials,
                              generator=torch.Generator().manual_seed(0),
                              scale_range=scale_range)


def test_canon_is_scale_invariant_and_finite_at_zero():
    v = torch.randn(5, 8, dtype=torch.float64) * 1e-3
    assert torch.allclose(canon(v * 1e-4), canon(v), rtol=1e-10, atol=0)  # ‖v‖ ~ 3e-7
    assert torch.allclose(canon(v * 1e8), canon(v), rtol=1e-15, atol=0)
    zero = torch.zeros(2, 8, requires_grad=True)
    canon(zero).sum().backward()
    assert torch.equal(canon(zero.detach()), zero.detach()) and zero.grad.isfinite().all()


@pytest.mark.parametrize("name", list(GRAPHS))
def test_encode_and_layers_are_equivariant(name):
    graph, net = _make(GRAPHS[name]), _net()
    assert bool(scalable_nodes(graph).any())
    assert _error(net.encode, graph, ["scale", "reindex"]) <= 1e-9
    assert _error(net, graph, [*KINDS, "reindex"]) <= 1e-9
    assert _error(net, graph, ["scale"], scale_range=(1e-2, 1e-2)) <= 1e-9


def test_max_and_min_aggregation_are_equivariant():
    # all messages to a node share its factor d_j > 0, so max and min commute with it
    net = _net(aggregators=("max", "min", "sum"))
    assert _error(net, _mixed(), [*KINDS, "reindex"]) <= 1e-9


def test_each_layer_is_equivariant_on_its_own():
    graph, net = _mixed(), _net(layers=3)
    torch.manual_seed(2)
    h, e = torch.randn(graph.num_nodes, 8, dtype=torch.float64), torch.randn(
        graph.edge_index.size(1), 8, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for index in range(3):
        element = sample(graph, generator, KINDS, WIDE)
        moved = act(element, graph)
        h_moved, e_moved = _like_weights(element, graph, (h, e))
        with torch.no_grad():
            out = net.layer(index, moved, h_moved, e_moved)
            target = _like_weights(element, graph, net.layer(index, graph, h, e))
        for a, b in zip(out, target, strict=True):
            assert float((a - b).norm() / b.norm()) <= 1e-9


@pytest.mark.parametrize("name", ["leaky_mlp", "mixed"])
def test_readout_is_invariant_and_edit_transforms_like_the_weights(name):
    graph, net = _make(GRAPHS[name]), _net()

    def readout(g):
        return net.readout(g, *net(g))

    def edit(g):  # (bias [|V|], edge [|E|, K]): ordered like the states for _like_weights
        edge, bias = net.edit(g, *net(g))
        return bias, edge

    assert_invariant(readout, graph, [*KINDS, "reindex"], scale_range=WIDE, trials=2,
                     generator=torch.Generator().manual_seed(0))
    assert _error(edit, graph, [*KINDS, "reindex"]) <= 1e-9
    assert readout(graph).shape == (getattr(graph, "num_graphs", 1), net.readout_dim)


def test_negative_control_sign_flips_are_not_a_symmetry_of_the_states():
    torch.manual_seed(0)
    graph = to_graph(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double())
    net = _net()
    assert _error(net, graph, ["sign"]) > 1e-3
    err = equivariance_error(lambda g: net.readout(g, *net(g)), graph, ["sign"],
                             output="invariant", generator=torch.Generator().manual_seed(0))
    assert err > 1e-3


def test_negative_control_scaling_output_units_breaks_equivariance():
    graph, net = _graph(_leaky_mlp), _net()
    out = graph.node_type == NodeType.OUTPUT
    scale = torch.ones(graph.num_nodes, dtype=torch.float64)
    scale[out] = torch.tensor([0.1, 3.0, 7.0, 0.5], dtype=torch.float64)
    element = dataclasses.replace(identity(graph), scale=scale)
    with torch.no_grad():
        moved = act(element, graph)
        target = _like_weights(element, graph, net(graph))
        state_err = max(float((a - b).norm() / b.norm())
                        for a, b in zip(net(moved), target, strict=True))
        before, after = net.readout(graph, *net(graph)), net.readout(moved, *net(moved))
    assert state_err > 1e-3
    assert float((after - before).norm() / before.norm()) > 1e-3


class _ReusedForwardBackwards(ScaleMPNN):
    """ScaleGMN's bidirectional bug: backward messages transport ``(A e_ij) ⊙ (B h_j)``
    to ``i``, which scales as ``d_j² / d_i`` instead of ``d_i``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            layer.backward_messages = ScaleMessages(self.hidden_dim, self.aggregators,
                                                    transport=True)


def test_negative_control_reusing_forward_messages_backwards_is_not_equivariant():
    graph = _graph(_relu_mlp)
    assert _error(_net(), graph, ["scale"]) <= 1e-9
    assert _error(_net(_ReusedForwardBackwards), graph, ["scale"]) > 1e-3


def _zoo_cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_float32_is_finite_and_equivariant_under_zoo_scalings_up_to_1e4():
    torch.manual_seed(0)
    graph = to_graph(_zoo_cnn())
    torch.manual_seed(1)
    net = ScaleMPNN(hidden_dim=32, num_layers=4, kernel_width=9)
    element = sample(graph, torch.Generator().manual_seed(0), ["scale"], (1.0, 1e4))
    moved = act(element, graph)
    assert moved.edge_attr.abs().max() > 1e3
    h, e = net(moved)
    readout = net.readout(moved, h, e)
    edge_edit, bias_edit = net.edit(moved, h, e)
    readout.square().sum().backward()
    for t in (h, e, readout, edge_edit, bias_edit,
              *(p.grad for p in net.parameters() if p.grad is not None)):
        assert t.isfinite().all()
    with torch.no_grad():
        plain = net(graph)
        target = _like_weights(element, graph, plain)
        base = net.readout(graph, *plain)
    assert max(float(t.abs().max()) for t in plain) < 1e3  # no compounding with depth
    for a, b in zip((h, e), target, strict=True):
        assert float((a.detach() - b).norm() / b.norm()) <= 1e-4
    assert float((readout.detach() - base).norm() / base.norm()) <= 1e-4
