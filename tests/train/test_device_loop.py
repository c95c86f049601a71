"""The training loop's GPU path, checked on the CPU: zoo batches share their structure's
memo (a steady-state step makes no host-device synchronisation), templates materialise
the same on any device, and a resume reads its checkpoint on the host."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from neuralgraph_quasi import to_graph
from neuralgraph_quasi.nn import QuasiGNN
from neuralgraph_quasi.train import Dist, Trainer
from neuralgraph_quasi.train._batches import DeviceTemplate, ZooLoader
from neuralgraph_quasi.train._tasks import PredictAccuracy

_spec = importlib.util.spec_from_file_location(
    "_sync_check", Path(__file__).resolve().parents[1] / "nn" / "_sync_check.py")
_sync_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sync_check)


def test_zoo_batches_share_what_the_model_memoises_on_their_structure(train_cfg, monkeypatch):
    from neuralgraph_quasi.data import load_zoo

    monkeypatch.setattr(torch.linalg, "solve", lambda A, B: torch.linalg.solve_ex(A, B)[0])
    data = load_zoo(train_cfg().dataset, "train")
    loader = ZooLoader(data, 3)
    torch.manual_seed(0)
    net = QuasiGNN(8, 2, kernel_width=data[0].edge_attr.size(1))
    net(loader.batch(torch.tensor([0, 1, 2])))
    batch = loader.batch(torch.tensor([5, 3, 4]))  # other members, same structure
    with _sync_check.SyncCheck() as check:
        out = net(batch)
        PredictAccuracy().loss(out, batch).backward()
    assert dict(check.calls) == {}


def test_loaders_over_one_dataset_share_its_batch_structures(train_cfg):
    """The trainer makes a loader per epoch and ``evaluate`` one per call: they must not
    collate (seconds for a large batch) and memoise (device waits) the structure again."""
    from neuralgraph_quasi.data import load_zoo

    data = load_zoo(train_cfg().dataset, "train")
    first = ZooLoader(data, 3).batch(torch.tensor([0, 1, 2]))
    second = ZooLoader(data, 3).batch(torch.tensor([3, 4, 5]))
    assert second.edge_index is first.edge_index
    assert not torch.equal(second.edge_attr, first.edge_attr)
    other_size = ZooLoader(data, 2).batch(torch.tensor([0, 1]))
    assert other_size.num_graphs == 2 and other_size.edge_index is not first.edge_index


def test_a_device_template_materialises_like_the_template():
    from neuralgraph_quasi.graph import template

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    tpl, values, _ = template(layer)
    assert bool(tpl.edge_const.ne(0).any())  # residual edges: a constant is added
    values = values[None] + torch.randn(3, values.numel(), dtype=values.dtype)
    expected = tpl.materialize(values)
    got = DeviceTemplate(tpl, torch.device("cpu")).materialize(values)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _trainer(directory: Path) -> Trainer:
    torch.manual_seed(0)
    graphs = []
    for i in range(6):
        graph = to_graph(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
        graph.y = torch.tensor([i / 6])
        graphs.append(graph)
    cfg = OmegaConf.create({"batch_size": 3, "epochs": 1, "warmup_fraction": 0.0,
                            "scheduler": "constant", "tensorboard": False, "grad_clip": 1.0})
    return Trainer(QuasiGNN(8, 2), PredictAccuracy(), graphs, graphs[:3], directory,
                   lambda params: torch.optim.Adam(params, lr=1e-3), cfg,
                   torch.device("cpu"), Dist(), config={})


def test_resume_reads_the_checkpoint_on_the_host(tmp_path):
    """``Optimizer.load_state_dict`` leaves Adam's ``step`` counters where the file put
    them: read onto a GPU, every later step would wait for the device to read them."""
    first = _trainer(tmp_path)
    first.fit(progress=False)
    second = _trainer(tmp_path)
    second.device = torch.device("meta")  # stands for an accelerator: nothing may land there
    second.resume(tmp_path / "last.ckpt")
    steps = [s["step"] for s in second.optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" for s in steps)
    assert second.step == first.step
