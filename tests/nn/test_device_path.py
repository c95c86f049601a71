"""The GPU path, checked on the CPU: a steady-state step makes no host-device
synchronisation (``_sync_check``), structure memos stay correct, and bfloat16 autocast
neither crashes nor rounds α or the edited weights away."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _sync_check import SyncCheck
from scipy import ndimage
from torch import nn

from neuralgraph_quasi import collate, models, to_graph
from neuralgraph_quasi.nn import FlatMLP, QuasiGNN, StatNN, tensor_statistics
from neuralgraph_quasi.nn._mpnn import EdgeMPLayer
from neuralgraph_quasi.nn._scale_mpnn import ScaleMessages
from neuralgraph_quasi.symmetry import sample
from neuralgraph_quasi.symmetry._act import _inverse
from neuralgraph_quasi.train._edit import grey_dilation


def _transformer():
    return models.TransformerClassifier(dim=8, depth=2, heads=2, hidden=12, num_classes=3)


def _mixed_batch(seed: int = 0):
    torch.manual_seed(seed)
    mods = [_transformer(),
            nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)),
            nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.BatchNorm2d(3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
            _transformer()]
    return collate([to_graph(m) for m in mods])


def _zoo_batch(count: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return collate([to_graph(_transformer()) for _ in range(count)])


QUASI = {"mpnn": {}, "scale_mpnn": {"backbone": "scale_mpnn"},
         "edit": {"task": "edit"}, "scale_edit": {"task": "edit", "backbone": "scale_mpnn"},
         "gl_invariant": {"gl_invariant": True}, "frozen": {"alpha": "frozen"},
         "plain": {"quasi": False}}


def _loss(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    return out.edge_attr.float().square().mean() + out.x.float().square().mean()


def _quasi(name: str) -> QuasiGNN:
    torch.manual_seed(1)
    return QuasiGNN(8, 3, **QUASI[name])


def _step_calls(model, batch) -> dict:
    model(batch)  # the first forward on a structure finds its index tensors
    with SyncCheck() as check:
        _loss(model(batch)).backward()
    return dict(check.calls)


@pytest.mark.parametrize("name", list(QUASI))
def test_a_steady_state_quasi_gnn_step_makes_no_host_device_sync(name, monkeypatch):
    # the CPU keeps the checked solver; the GPU path uses solve_ex (see the test below)
    monkeypatch.setattr(torch.linalg, "solve", lambda A, B: torch.linalg.solve_ex(A, B)[0])
    calls = _step_calls(_quasi(name), _mixed_batch())
    assert calls == {}


def test_the_baselines_make_no_host_device_sync():
    batch = _zoo_batch()
    graph = to_graph(_transformer())
    num_params = sum(p.numel() for p in _transformer().parameters())
    assert _step_calls(StatNN(len(graph.params), 16, 2), batch) == {}
    assert _step_calls(FlatMLP(num_params, 16, 2), batch) == {}


def test_off_the_cpu_the_inverse_skips_the_singularity_check_and_works_in_float32():
    A = torch.eye(3, device="meta").expand(2, 3, 3)
    with SyncCheck() as check:
        inverse = _inverse(A)
    assert inverse.device.type == "meta" and dict(check.calls) == {}
    half = torch.tensor([[2.0, 1.0], [0.0, 4.0]]).to(torch.bfloat16)[None]
    inverse = _inverse(half)  # no half-precision solver exists
    assert inverse.dtype == torch.bfloat16
    assert torch.allclose(inverse.float(), torch.tensor([[[0.5, -0.125], [0.0, 0.25]]]))


# -- the structure memo ------------------------------------------------------------------

def test_the_memo_follows_in_place_changes_and_replaced_fields():
    batch = _zoo_batch()
    first = tensor_statistics(batch)
    assert tensor_statistics(batch).graph is first.graph  # memoised
    # leave one bias value out of the statistics, in place
    fresh = copy.deepcopy(batch)
    node = int((batch.node_param[:, 0] >= 0).nonzero()[0, 0])
    for b in (batch, fresh):
        b.node_param[node, 0] = -1
    assert int(tensor_statistics(batch).count.sum()) == int(first.count.sum()) - 1
    assert torch.equal(tensor_statistics(batch).stats, tensor_statistics(fresh).stats)
    # a copy with another structure gets its own entry; the original keeps its own
    other = copy.copy(batch)
    other.node_param = other.node_param.clone()
    other.node_param[(other.node_param >= 0).nonzero()[0, 0], 0] = -1
    fresh_other = copy.deepcopy(other)
    assert torch.equal(tensor_statistics(other).stats, tensor_statistics(fresh_other).stats)
    assert torch.equal(tensor_statistics(batch).stats, tensor_statistics(fresh).stats)


def test_memos_made_under_inference_mode_serve_a_later_training_step():
    batch, net = _mixed_batch(), _quasi("mpnn")
    with torch.inference_mode():
        net(batch)
    _loss(net(batch)).backward()  # inference tensors cannot be saved for backward
    assert net.alpha.rho.grad is not None


def test_predictions_are_the_same_with_a_warm_and_a_cold_memo():
    net = _quasi("mpnn")
    batch = _mixed_batch()
    warm = net(batch)
    assert torch.equal(net(batch), warm)
    assert torch.equal(net(_mixed_batch()), warm)


# -- mixed precision ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(QUASI))
def test_a_bfloat16_autocast_step_runs_and_gives_finite_gradients(name):
    net, batch = _quasi(name), _mixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(batch)
    _loss(out).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["mpnn", "scale_mpnn"])
def test_alpha_is_not_rounded_away_under_autocast(name):
    """ε ≈ 0.01: in bfloat16, ``1 + ε·sin(·)`` rounds to multiples of 2⁻⁸ (or to 1), an
    error of up to 2⁻⁹ ≈ 0.002, a fifth of the deviation. α is computed in float32, so what
    remains is the bfloat16 rounding of the backbone states it reads, which γ (spread by
    order one across units, docs/quasi.md) passes on at a few percent of the deviation."""
    net, batch = _quasi(name), _mixed_batch()
    net(batch)
    exact = net.last_alpha.scale.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(batch)
    amp = net.last_alpha.scale.detach()
    assert amp.dtype == torch.float32
    deviation = (exact - 1).abs().max()
    assert deviation > 0
    assert (amp - exact).abs().max() < 0.1 * deviation


def test_alpha_acts_on_float32_states_under_autocast(monkeypatch):
    """CUDA's autocast runs LayerNorm in float32, so α meets float32 states while its GL
    products come out of the matmul in bfloat16. CPU autocast promotes ``index_copy`` to
    the wider type, CUDA's does not: emulated here."""
    index_copy = torch.Tensor.index_copy

    def strict_index_copy(self, dim, index, source):
        if self.dtype != source.dtype:
            raise RuntimeError(f"index_copy: {self.dtype} and {source.dtype} (as on CUDA)")
        return index_copy(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy", strict_index_copy)
    net, batch = _quasi("mpnn"), _mixed_batch()
    net(batch)
    alpha = net.last_alpha
    torch.manual_seed(2)
    h, e = torch.randn(batch.num_nodes, 8), torch.randn(batch.num_edges, 8)
    h_ref, e_ref = alpha.act(batch, h, e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_amp, e_amp = alpha.act(batch, h, e)
    assert h_amp.dtype == e_amp.dtype == torch.float32
    assert torch.allclose(h_amp, h_ref, atol=0.05) and torch.allclose(e_amp, e_ref, atol=0.05)


def test_the_readout_statistics_are_standardised_in_float32_under_autocast():
    """Statistics that differ by less than bfloat16's resolution across networks (a mean
    of 1.000 against 1.001) would become one value before the batch norm."""
    net, batch = _quasi("mpnn"), _mixed_batch()
    seen = []
    net.stat_norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(batch)
    assert seen == [torch.float32]


@pytest.mark.parametrize("name", ["edit", "scale_edit"])
def test_edited_weights_keep_full_precision_under_autocast(name):
    """The edit is ``α·θ + Δ``: with ``Δ = 0`` it is α·θ, which autocast must not round."""
    net, batch = _quasi(name), _mixed_batch()
    net(batch)
    zero_e = torch.zeros(batch.num_edges, 9, dtype=torch.bfloat16)
    zero_b = torch.zeros(batch.num_nodes, dtype=torch.bfloat16)
    exact = net._edited(batch, zero_e.float(), zero_b.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = net._edited(batch, zero_e, zero_b)
    assert amp.edge_attr.dtype == batch.edge_attr.dtype
    assert torch.allclose(amp.edge_attr, exact.edge_attr, rtol=1e-6, atol=1e-7)
    assert torch.allclose(amp.x, exact.x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layer", [EdgeMPLayer(4), ScaleMessages(4)],
                         ids=["mpnn", "scale_mpnn"])
def test_half_precision_messages_are_summed_in_float32(layer):
    torch.manual_seed(0)
    messages = torch.randn(5000, 4).bfloat16()
    index = torch.zeros(5000, dtype=torch.long)
    out = layer.aggregate(messages, index, dim_size=1)
    assert out.dtype == torch.float32
    wide = messages.double()
    expected = {"mean": wide.mean(0), "sum": wide.sum(0), "max": wide.max(0).values}
    names = [type(a).__name__.removesuffix("Aggregation").lower()
             for a in layer.aggr_module.aggrs]
    for i, name in enumerate(names):
        got = out[0, 4 * i:4 * (i + 1)].double()
        assert torch.allclose(got, expected[name], rtol=1e-6, atol=1e-6), name
    # other precisions: PyG's aggregation, unchanged
    plain = torch.randn(10, 4)
    ref = type(layer).__mro__[1].aggregate(layer, plain, index[:10], dim_size=1)
    assert torch.equal(layer.aggregate(plain, index[:10], dim_size=1), ref)


# -- the rest of the step ----------------------------------------------------------------

@pytest.mark.parametrize("size", range(1, 7))
def test_grey_dilation_on_the_device_equals_scipy(size):
    images = np.random.default_rng(size).standard_normal((3, 7, 9)).astype(np.float32)
    expected = ndimage.grey_dilation(images, size=(1, size, size), mode="nearest")
    assert np.array_equal(grey_dilation(torch.from_numpy(images), size).numpy(), expected)


def test_group_elements_invert_on_any_device():
    g = sample(_zoo_batch(2), torch.Generator().manual_seed(0)).to("meta")
    h = g.inverse()  # its head map and arange were made on the CPU
    assert {t.device.type for t in (h.perm, h.scale, h.heads, h.M, h.N)} == {"meta"}
