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
         "training", "inference", "--device", "cpu", "--json", str(out_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| training" in done.stdout and "| inference" in done.stdout  # the markdown table
    record = json.loads(out_file.read_text())
    assert record["sections"] == ["training", "inference"] and record["complete"]
    assert record["tf32"] is False
    assert record["environment"]["device"] == "cpu"
    rows = record["results"]
    for name in ("training", "inference"):
        mine = [r for r in rows if r["section"] == name]
        # every workload, quasi and plain
        assert {(r["workload"], r["quasi"]) for r in mine} == {
            (w, q) for w in ("siren", "cnn", "agnews") for q in (True, False)}
        for r in mine:
            assert math.isfinite(r["graphs_per_s"]) and r["graphs_per_s"] > 0, r
            assert r["device"] == "cpu" and r["peak_mem_gb"] is None
            assert r["syncs_per_step"] is None  # counted by CUDA's sync debug mode only
            assert r["batch"] > 0 and r["width"] > 0 and r["layers"] == 4
        for r in mine:
            if r["quasi"]:
                assert math.isfinite(r["quasi_over_plain"]) and r["quasi_over_plain"] > 0
