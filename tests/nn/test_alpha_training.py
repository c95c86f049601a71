"""α can be trained: at initialisation γ spreads by order one, gradients reach γ and ε at the
backbone's scale, and ε's modes (learned, fixed, frozen) do what they say.

Measured on members of a tiny generated AGNews zoo (the default zoo's architecture and
training recipe, fewer and shorter runs), with the main job's model (width 16, 2 layers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuralgraph_quasi.data import SmallTransformerZoo
from neuralgraph_quasi.data.generate import agnews
from neuralgraph_quasi.nn import QuasiGNN
from neuralgraph_quasi.symmetry import scalable_nodes
from neuralgraph_quasi.train._batches import ZooLoader

TINY = dict(num_models=8, models_per_chunk=8, epochs=1, ckpt_epochs=(1,), train_docs=96,
            test_docs=48, batch_size=16, topic_words=20, neutral_words=40, progress=False,
            workers=1, seed=0)


@pytest.fixture(scope="module")
def zoo_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("agnews")
    agnews.generate(root=str(root), **TINY)
    data = SmallTransformerZoo(str(root), split="train", splits=[1.0, 0.0, 0.0])
    assert len(data) == 8
    return ZooLoader(data, 8).batch(torch.arange(8))


def _step(batch, **kwargs) -> QuasiGNN:
    torch.manual_seed(0)
    net = QuasiGNN(16, 2, kernel_width=1, **kwargs).train()
    loss = F.binary_cross_entropy_with_logits(net(batch).view(-1), batch.y.view(-1).float())
    loss.backward()
    return net


def _ratios(net: QuasiGNN) -> dict[str, float]:
    rms = net.gradient_rms()
    return {"gamma": rms["gamma"] / rms["backbone"], "eps": rms["eps"] / rms["backbone"]}


def test_gradients_reach_gamma_and_eps_at_the_backbone_scale(zoo_batch):
    ratios = _ratios(_step(zoo_batch, eps_init=0.1))
    for name, ratio in ratios.items():
        assert 1e-2 <= ratio <= 1e2, f"RMS gradient ratio {name}/backbone = {ratio:.2e}"


def test_negative_control_the_old_placement_starves_gamma(zoo_batch):
    """α on hidden states after a layer (followed by residual + LayerNorm) with the paper's
    ε = 0.01: the gradient reaching γ is orders of magnitude below the backbone's."""
    ratios = _ratios(_step(zoo_batch, eps_init=0.01, alpha_on="states"))
    assert ratios["gamma"] < 1e-2


def test_gamma_spreads_by_order_one_across_units_at_initialisation(zoo_batch):
    net = _step(zoo_batch, eps_init=0.1)
    alpha = net.last_alpha
    sin_gamma = (alpha.scale[scalable_nodes(zoo_batch)].detach() - 1) / 0.1
    assert float(sin_gamma.std()) > 0.3
    eye = torch.eye(alpha.N.size(-1))
    assert float(((alpha.N.detach() - eye) * alpha.N.size(-1) / 0.1).std()) > 0.1


def test_fixed_eps_stays_and_gamma_still_trains(zoo_batch):
    net = _step(zoo_batch, alpha="fixed", eps_init=0.3)
    assert not net.alpha.rho.requires_grad
    assert torch.equal(net.alpha.eps, torch.full((3,), 0.3))
    assert net.gradient_rms()["gamma"] > 0
    before = [p.detach().clone() for p in net.alpha.gamma_scale.parameters()]
    torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.equal(net.alpha.eps, torch.full((3,), 0.3))
    assert any(not torch.equal(a, b) for a, b in
               zip(before, net.alpha.gamma_scale.parameters(), strict=True))


def test_learned_eps_moves_and_stays_inside_its_bounds(zoo_batch):
    torch.manual_seed(0)
    net = QuasiGNN(16, 2, kernel_width=1, eps_init=0.1, eps_min=0.05, eps_max=0.5).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    for _ in range(5):  # a huge step size: ε is pushed against its bounds
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(zoo_batch).view(-1),
                                           zoo_batch.y.view(-1).float()).backward()
        opt.step()
    eps = net.alpha.eps.detach()
    assert not torch.allclose(eps, torch.full((3,), 0.1))
    assert bool((eps >= 0.05).all() and (eps <= 0.5).all())
    net(zoo_batch)
    assert bool((net.last_alpha.scale > 0).all())
    for factor in (net.last_alpha.M.detach(), net.last_alpha.N.detach()):
        assert float(torch.linalg.svdvals(factor).min()) > 0.4  # ‖M − I‖₂ ≤ ε_max
