"""Resume continues at the saved step; Ctrl-C saves; a corrupt checkpoint fails clearly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from neuralgraph_quasi.train import CheckpointError, load_checkpoint, run
from neuralgraph_quasi.train._tasks import PredictAccuracy

FAST = ("model=statnn", "train_baseline=false", "eval.augment=null", "plots=false")


def test_resume_continues_at_the_saved_step(train_cfg):
    first = run(train_cfg(*FAST, "trainer.epochs=1"))  # 15 train runs of 24, batch 4: 3 steps
    out = Path(train_cfg().output_dir)
    assert first["steps"] == 3 and load_checkpoint(out / "last.ckpt")["step"] == 3
    second = run(train_cfg(*FAST, "trainer.epochs=2", f"trainer.resume={out}",
                           "output_dir=/nonexistent/ignored"))
    assert second["resumed_from_step"] == 3 and second["steps"] == 6
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [3, 6]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_epoch(train_cfg, monkeypatch):
    calls = {"n": 0}
    loss = PredictAccuracy.loss

    def interrupted(self, out, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return loss(self, out, batch)

    monkeypatch.setattr(PredictAccuracy, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(*FAST))
    out = Path(train_cfg().output_dir)
    state = load_checkpoint(out / "last.ckpt")
    assert state["step"] == 2 and state["epoch"] == 0 and state["batch_in_epoch"] == 2
    monkeypatch.setattr(PredictAccuracy, "loss", loss)
    metrics = run(train_cfg(*FAST, f"trainer.resume={out}"))
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6


def test_a_corrupt_checkpoint_fails_with_a_message_naming_it(train_cfg, tmp_path):
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(b"PK\x03\x04 not really a torch file")
    with pytest.raises(CheckpointError, match=r"broken/last\.ckpt.*corrupt"):
        run(train_cfg(*FAST, f"trainer.resume={run_dir}"))
    with pytest.raises(CheckpointError, match="no last.ckpt"):
        run(train_cfg(*FAST, f"trainer.resume={tmp_path / 'missing'}"))
