"""``scripts/benchmark.py --quick``: the training and inference sections on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_training_and_inference_write_finite_rates(tmp_path):
    out_file = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--sections",
         "training", "inference", "--device", "cpu", "--variants", "eager", "amp", "--json",
         str(out_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| training" in done.stdout and "| inference" in done.stdout  # the markdown table
    assert "torch threads: 1" in done.stdout and "CPU: " in done.stdout
    record = json.loads(out_file.read_text())
    assert record["sections"] == ["training", "inference"] and record["complete"]
    assert record["tf32"] is False
    assert record["environment"]["device"] == "cpu"
    rows = record["results"]
    for name in ("training", "inference"):
        mine = [r for r in rows if r["section"] == name]
        # every workload: the yardstick, quasi eager and under autocast, plain
        assert sorted((r["workload"], r["variant"], r["quasi"]) for r in mine) == sorted(
            (w, v, q) for w in ("siren", "cnn", "agnews")
            for v, q in (("yardstick", None), ("eager", True), ("amp", True), ("eager", False)))
        for r in mine:  # ratio to the yardstick timed in the same run, on the same batch
            yard = next(y for y in mine if y["variant"] == "yardstick"
                        and (y["workload"], y["batch"], y["width"])
                        == (r["workload"], r["batch"], r["width"]))
            assert r["yardstick_graphs_per_s"] == yard["graphs_per_s"]
            assert math.isclose(r["ratio"], r["graphs_per_s"] / yard["graphs_per_s"])
            assert r["amp"] == (r["variant"] == "amp")
        mine = [r for r in mine if r["variant"] != "yardstick"]
        for r in mine:
            assert math.isfinite(r["graphs_per_s"]) and r["graphs_per_s"] > 0, r
            assert r["device"] == "cpu" and r["peak_mem_gb"] is None
            assert r["syncs_per_step"] is None  # counted by CUDA's sync debug mode only
            assert r["batch"] > 0 and r["width"] > 0 and r["layers"] == 4
        for r in mine:
            if r["quasi"] and r["variant"] == "eager":
                assert math.isfinite(r["quasi_over_plain"]) and r["quasi_over_plain"] > 0


def test_yardstick_is_the_issue_14_gineconv_stack():
    """``depth`` x ``h = h + GINEConv(MLP(H->H->H, SiLU), edge_dim=H)(h, edge_index, e)`` after
    ``h = Linear(x)``, ``e = Linear(edge_attr)``; mean pool; ``Linear(H, 1)``."""
    import torch
    from torch import nn
    from torch_geometric.nn import GINEConv, global_mean_pool

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    batch, _ = benchmark.device_batch("siren", 3, torch.device("cpu"))
    torch.manual_seed(0)
    model = benchmark.Yardstick(batch.x.size(1), batch.edge_attr.size(1), 8)
    assert len(model.convs) == benchmark.NUM_LAYERS
    for conv in model.convs:
        assert isinstance(conv, GINEConv) and conv.lin.in_channels == 8
        assert [type(m) for m in conv.nn] == [nn.Linear, nn.SiLU, nn.Linear]
        assert [(m.in_features, m.out_features) for m in conv.nn[::2]] == [(8, 8), (8, 8)]
    h, e = model.node_in(batch.x), model.edge_in(batch.edge_attr)
    for conv in model.convs:
        h = h + conv(h, batch.edge_index, e)
    expected = model.out(global_mean_pool(h, batch.batch, size=3))
    assert torch.equal(model(batch), expected) and expected.shape == (3, 1)
