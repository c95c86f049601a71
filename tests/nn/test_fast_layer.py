"""The fast ``EdgeMPLayer`` (issue #14) computes the function of the layer as it was before:
outputs and gradients of the whole model within 1e-5 (float32, same parameters), checked
against a reference copy of the old layer (PyG ``propagate`` in both directions, chunked
linear maps, PyG's ``scatter`` aggregations) kept in this module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from neuralgraph_quasi import collate, models, to_graph
from neuralgraph_quasi.data.cnn_zoo import small_cnn
from neuralgraph_quasi.nn import QuasiGNN
from neuralgraph_quasi.nn._mpnn import EdgeMPLayer, aggregate_exact, scatter_extremum

TOL = 1e-5


class _ReferenceLayer(EdgeMPLayer):
    """``EdgeMPLayer`` as it was at the start of issue #14 (PyG's ``propagate``)."""

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        u, v = self.edge_nodes(h).chunk(2, dim=-1)
        e = self.edge_updater(edge_index, u=u, v=v, e=e)
        a, b, a_rev, b_rev = self.message_nodes(h).chunk(4, dim=-1)
        gamma, beta, gamma_rev, beta_rev = self.film(e).chunk(4, dim=-1)
        up = self.propagate(edge_index, a=a, b=b, gamma=gamma, beta=beta)
        down = self.propagate(edge_index.flip(0), a=a_rev, b=b_rev, gamma=gamma_rev,
                              beta=beta_rev)
        h = self.node_norm(h + self.node_mlp(torch.cat([h, up, down], dim=-1)))
        return h, e

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Tensor | None = None,
                  dim_size: int | None = None) -> Tensor:
        return MessagePassing.aggregate(self, inputs, index, ptr, dim_size)

    def edge_update(self, u_j: Tensor, v_i: Tensor, e: Tensor) -> Tensor:
        hidden = torch.nn.functional.silu(u_j + v_i + self.edge_self(e))
        return self.edge_norm(e + self.edge_out(hidden))

    def message(self, a_j: Tensor, b_i: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        return torch.nn.functional.silu(a_j + b_i) * (1 + gamma) + beta


def _reference(model: QuasiGNN) -> QuasiGNN:
    """A copy of ``model`` with the same parameters and the reference layers."""
    ref = copy.deepcopy(model)
    for i, layer in enumerate(model.backbone.layers):
        old = _ReferenceLayer(layer.hidden_dim)
        old.load_state_dict(layer.state_dict())
        ref.backbone.layers[i] = old
    return ref


def _batch(kind: str):
    torch.manual_seed(3)
    if kind == "siren":
        nets = [models.siren() for _ in range(3)]
    elif kind == "cnn":
        nets = [small_cnn() for _ in range(3)]
    else:
        nets = [models.TransformerClassifier(dim=8, depth=2, heads=2, hidden=12,
                                             num_classes=3) for _ in range(2)]
        nets.append(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))
    return collate([to_graph(n) for n in nets])


def _outputs_and_grads(model: QuasiGNN, batch) -> tuple[Tensor, dict[str, Tensor]]:
    out = model(batch)
    out.square().sum().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["siren", "cnn", "transformer"])
@pytest.mark.parametrize("quasi", [True, False])
def test_fast_layer_matches_the_reference_layer(kind, quasi):
    batch = _batch(kind)
    torch.manual_seed(0)
    model = QuasiGNN(16, 3, quasi=quasi, kernel_width=9)
    ref_model = _reference(model)
    out, grads = _outputs_and_grads(model, batch)
    ref, ref_grads = _outputs_and_grads(ref_model, batch)
    assert out.abs().max() > 1e-3  # not a vanishing output
    assert torch.allclose(out, ref, rtol=TOL, atol=TOL), (out - ref).abs().max()
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=TOL), name


def test_fast_layer_differs_from_a_perturbed_reference():
    """Negative control: the comparison above sees FiLM's γ→ and γ← rows exchanged (what
    a wrong reordering in the fused layer would do)."""
    batch = _batch("siren")
    torch.manual_seed(0)
    model = QuasiGNN(16, 3, quasi=False)
    ref = _reference(model)
    with torch.no_grad():
        film = ref.backbone.layers[1].film
        film.weight[:] = film.weight[[*range(32, 48), *range(16, 32), *range(16), *range(48, 64)]]
    assert not torch.allclose(model(batch), ref(batch), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("reduce", ["amax", "amin"])
def test_scatter_extremum_matches_scatter_reduce_with_ties(reduce):
    torch.manual_seed(0)
    # many ties within segments; no extremum exactly 0, where scatter_reduce counts the
    # zero it starts from as one more tie
    src = torch.randn(60, 3).round(decimals=0) + 0.5
    index = torch.randint(0, 9, (60,))  # some of the 10 segments are empty
    src_ref = src.clone().requires_grad_()
    src.requires_grad_()
    out = scatter_extremum(src, index, 10, reduce)
    ref = scatter(src_ref, index, 0, dim_size=10, reduce=reduce[1:])
    assert torch.equal(out, ref)
    grad = torch.randn(10, 3)
    out.backward(grad)
    ref.backward(grad)
    assert torch.allclose(src.grad, src_ref.grad, rtol=1e-6, atol=1e-7)


def test_aggregate_exact_falls_back_to_pyg_for_other_aggregations():
    layer = EdgeMPLayer(4, aggregators=("mean", "std"))
    torch.manual_seed(0)
    x, index = torch.randn(20, 4), torch.randint(0, 5, (20,))
    assert torch.equal(aggregate_exact(layer, x, index, None, 5),
                       MessagePassing.aggregate(layer, x, index, None, 5))
