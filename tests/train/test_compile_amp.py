"""``trainer.compile`` and ``trainer.amp`` (``auto|true|false``, issue #14): the static rule,
its errors, and compiled layers computing what the eager ones do."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from neuralgraph_quasi import collate, models, to_graph
from neuralgraph_quasi.nn import QuasiGNN, StatNN, compile_layers
from neuralgraph_quasi.nn._compile import compile_supported, compiled_layers
from neuralgraph_quasi.train import PredictAccuracy
from neuralgraph_quasi.train._distributed import Dist
from neuralgraph_quasi.train._loop import (
    COMPILE_MIN_STEPS,
    Trainer,
    native_bfloat16,
    resolve_amp,
    resolve_compile,
)

CPU = torch.device("cpu")


def _cfg(**kw):
    return OmegaConf.create(kw)


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True),
                                             ("false", False), ("False", False)])
def test_explicit_amp_and_compile_are_obeyed(value, expected):
    assert resolve_amp(_cfg(amp=value), CPU)[0] is expected
    assert resolve_compile(_cfg(compile=value), QuasiGNN(8, 2), CPU, 10)[0] is expected


def test_auto_amp_follows_the_device_bfloat16_units():
    amp, reason = resolve_amp(_cfg(amp="auto"), CPU)
    assert amp is native_bfloat16(CPU) and "auto" in reason
    assert resolve_amp(_cfg(), CPU)[0] is False  # default: float32
    assert resolve_amp(_cfg(amp="auto"), torch.device("meta"))[0] is False


def test_auto_compile_needs_layers_a_compiler_and_a_long_run():
    model = QuasiGNN(8, 2)
    short, reason = resolve_compile(_cfg(), model, CPU, COMPILE_MIN_STEPS - 1)
    assert short is False and "too short" in reason
    long, reason = resolve_compile(_cfg(compile="auto"), model, CPU, COMPILE_MIN_STEPS)
    assert long is compile_supported()
    for value in ("auto", True):  # the STATNN baseline of a compiled run: nothing to compile
        baseline, reason = resolve_compile(_cfg(compile=value), StatNN(8), CPU,
                                           10 * COMPILE_MIN_STEPS)
        assert baseline is False and "StatNN has no layers to compile" in reason


@pytest.mark.parametrize("key", ["amp", "compile"])
def test_a_bad_switch_is_named(key):
    with pytest.raises(ValueError, match=f"trainer.{key} must be auto, true or false, got 'yes'"):
        (resolve_amp(_cfg(amp="yes"), CPU) if key == "amp"
         else resolve_compile(_cfg(compile="yes"), QuasiGNN(8, 2), CPU, 10))


def test_trainer_logs_its_choice_and_compiles_in_place(tmp_path, caplog):
    graphs = []
    for i in range(4):
        graph = to_graph(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
        graph.y = torch.tensor([i / 4])
        graphs.append(graph)
    cfg = _cfg(batch_size=2, epochs=1, warmup_fraction=0.0, scheduler="constant",
               compile=True, amp=False)
    model = QuasiGNN(8, 2)
    names = list(model.state_dict())
    with caplog.at_level(logging.INFO, logger="neuralgraph_quasi.train._loop"):
        trainer = Trainer(model, PredictAccuracy(), graphs, graphs[:2], tmp_path,
                          lambda params: torch.optim.Adam(params, lr=1e-3), cfg, CPU, Dist(),
                          config={})
    assert trainer.compile and not trainer.amp
    assert compiled_layers(model) == 2 and list(model.state_dict()) == names
    assert "layers compiled (trainer.compile=true)" in caplog.text
    assert "float32 (trainer.amp=false)" in caplog.text


def test_compile_layers_rejects_a_model_without_layers():
    with pytest.raises(ValueError, match="compile_layers: StatNN has no backbone.layers"):
        compile_layers(StatNN(8))


@pytest.mark.slow
@pytest.mark.skipif(not compile_supported(), reason="torch.compile needs a C++ compiler")
def test_compiled_layers_match_eager_with_fullgraph():
    """``compile_layers`` (``fullgraph=True``: a graph break would raise) computes the eager
    model's outputs and gradients within 1e-5. About a minute on the 2-core CPU."""
    torch.manual_seed(0)
    batch = collate([to_graph(models.siren()) for _ in range(2)])
    model = QuasiGNN(8, 2)
    out = model(batch)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compile_layers(model)
    assert compiled_layers(model) == 2
    compiled = model(batch)
    compiled.square().sum().backward()
    assert torch.allclose(compiled, out, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        p = dict(model.named_parameters())[name]
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5), name
