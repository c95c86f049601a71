"""Run directories are never shared by two runs; a resume with another identity is refused."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from neuralgraph_quasi.train import CheckpointError, run
from neuralgraph_quasi.train._rundir import RUN_LOCK

FAST = ("model=statnn", "train_baseline=false", "eval.augment=null", "plots=false",
        "trainer.epochs=1")


def test_a_directory_in_use_or_finished_is_not_shared(train_cfg):
    cfg = train_cfg(*FAST)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    # another run started in the same second holds the directory
    fd = os.open(out / RUN_LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        metrics = run(cfg)
    finally:
        os.close(fd)
    second = Path(metrics["run_dir"])
    assert second == out.with_name(out.name + "_2")
    assert json.loads((second / "metrics.json").read_text())["run_dir"] == str(second)
    assert not (out / "metrics.json").exists()
    # a finished run keeps its outputs: the next run with the same directory goes elsewhere
    before = (second / "metrics.json").read_bytes()
    third = Path(run(train_cfg(*FAST, f"output_dir={second}"))["run_dir"])
    assert third != second and (second / "metrics.json").read_bytes() == before


def test_resume_with_another_identity_is_refused_naming_the_keys(train_cfg, tmp_path):
    run(train_cfg(*FAST))
    out = Path(train_cfg().output_dir)
    log_before = (out / "log.csv").read_text()
    for overrides, keys in ((("width=12",), "width"),
                            (("model=flat_mlp",), "model._target_"),
                            (("dataset=inr", "task=classify"), "dataset.name"),
                            ((f"dataset.root={tmp_path / 'elsewhere'}",), "dataset.root"),
                            (("loss=mse", "depth=3"), "depth, loss")):
        with pytest.raises(CheckpointError, match=rf"differs from the run's: {keys}\b") as info:
            run(train_cfg(*FAST, *overrides, f"trainer.resume={out}"))
        assert "\n" not in str(info.value)
    assert (out / "log.csv").read_text() == log_before
    resumed = run(train_cfg(*FAST, "trainer.epochs=2", f"trainer.resume={out}"))
    assert resumed["resumed_from_step"] > 0
