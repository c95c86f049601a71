"""torchrun with two gloo processes on CPU trains with DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_gloo_processes_train_and_write_one_metrics_file(zoo_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "scripts" / "train.py"), "debug=tiny", "model=statnn", "eval.augment=null",
         f"paths.data_dir={zoo_dir}", f"paths.output_dir={tmp_path}", f"output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 17 training graphs over 2 ranks: 9 per rank, batches of 4 (last dropped): 2 steps/epoch
    assert metrics["steps"] == 4
    assert (out / "best.ckpt").exists() and (out / "baseline" / "best.ckpt").exists()
