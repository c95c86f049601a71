"""The scripts run end to end from the command line (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_demo_checks_round_trips_and_symmetries(tmp_path):
    out = run(str(ROOT / "scripts" / "demo.py"), cwd=tmp_path)
    assert "all checks passed" in out


def test_make_zoo_writes_a_zoo_and_a_rerun_is_a_no_op(tmp_path):
    args = (str(ROOT / "scripts" / "make_zoo.py"), "dataset=inr", f"dataset.root={tmp_path}/inr",
            "dataset.num_models=4", "dataset.generator.steps=2", "dataset.generator.image_size=8",
            f"hydra.run.dir={tmp_path}/hydra")
    assert "ready at" in run(*args, cwd=tmp_path)
    manifest = json.loads((tmp_path / "inr" / "generator.json").read_text())
    assert manifest["config"]["num_models"] == 4
    assert "ready at" in run(*args, cwd=tmp_path)


def test_benchmark_quick_writes_its_table(tmp_path):
    out_file = tmp_path / "bench.json"
    run(str(ROOT / "scripts" / "benchmark.py"), "--quick", "--sections", "conversion",
        "--out", str(out_file), cwd=tmp_path)
    record = json.loads(out_file.read_text())
    assert record["sections"] == ["conversion"]
    assert all(row["models_per_s"] > 0 for row in record["results"])
