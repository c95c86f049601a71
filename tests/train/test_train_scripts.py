"""scripts/compare.py and scripts/predict.py from the command line, tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from neuralgraph_quasi import to_model
from neuralgraph_quasi.data import load_zoo

ROOT = Path(__file__).resolve().parents[2]


def _script(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_compare_writes_a_table_over_models_seeds_and_thresholds(zoo_dir, tmp_path):
    out = tmp_path / "cmp"
    text = _script(str(ROOT / "scripts" / "compare.py"), "debug=tiny",
                   "compare.models=[statnn,flat_mlp]", "compare.seeds=[0,1]",
                   "compare.thresholds=[0.0,0.3]", "compare.reference=statnn",
                   "eval.augment=null", "plots=false", f"paths.data_dir={zoo_dir}",
                   f"paths.output_dir={tmp_path}", f"output_dir={out}", cwd=tmp_path)
    table = (out / "results.md").read_text()
    assert "| statnn |" in table and "| flat_mlp |" in table and "acc >= 30%" in table
    assert "±" in table and "written:" in text
    results = json.loads((out / "results.json").read_text())
    assert len(results["statnn"]["scores"]["0.0"]) == 2


def test_predict_script_reads_a_saved_module(train_cfg, tmp_path):
    from neuralgraph_quasi.train import run

    cfg = train_cfg("model=statnn", "train_baseline=false", "eval.augment=null", "plots=false")
    run(cfg)
    test = load_zoo(cfg.dataset, "test", generate=False)
    torch.save(to_model(test[0], test.make_model(test[0])), tmp_path / "member.pt")
    text = _script(str(ROOT / "scripts" / "predict.py"), f"run={cfg.output_dir}",
                   f"model={tmp_path / 'member.pt'}", cwd=tmp_path)
    assert "predicted accuracy: 0." in text


def test_compare_goes_on_from_an_interrupted_runs_checkpoint(zoo_dir, train_cfg, tmp_path):
    from neuralgraph_quasi.train import run

    out = tmp_path / "cmp"
    args = ["debug=tiny", "eval.augment=null", "plots=false", "train_baseline=false",
            f"paths.data_dir={zoo_dir}", f"paths.output_dir={tmp_path}"]
    # a run stopped after its first epoch: last.ckpt written, no metrics.json
    first = train_cfg(*args[1:], "model=statnn", "seed=0", "trainer.epochs=1",
                      f"output_dir={out / 't0' / 'statnn' / 'seed0'}", config="compare")
    run(first)
    (out / "t0" / "statnn" / "seed0" / "metrics.json").unlink()
    _script(str(ROOT / "scripts" / "compare.py"), *args, "trainer.epochs=2",
            "compare.models=[statnn]", "compare.seeds=[0]", "compare.thresholds=[0.0]",
            "compare.reference=statnn", f"output_dir={out}", cwd=tmp_path)
    metrics = json.loads((out / "t0" / "statnn" / "seed0" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] > 0
