"""Degenerate training settings stop up front with one line naming the key."""

from __future__ import annotations

import pytest

from neuralgraph_quasi.train import ConfigError, run


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.batch_size=0", r"trainer\.batch_size=0: must be an integer >= 1"),
    ("trainer.batch_size=-1", r"trainer\.batch_size=-1: must be an integer >= 1"),
    ("trainer.batch_size=2.5", r"trainer\.batch_size=2\.5: must be an integer >= 1"),
    ("trainer.epochs=0", r"trainer\.epochs=0: must be an integer >= 1"),
    ("trainer.eval_batch_size=0", r"trainer\.eval_batch_size=0"),
    ("trainer.baseline_epochs=-2", r"trainer\.baseline_epochs=-2"),
    ("trainer.max_steps=0", r"trainer\.max_steps=0: must be null or an integer >= 1"),
    ("trainer.log_every=0", r"trainer\.log_every=0"),
    ("trainer.warmup_fraction=1.5", r"trainer\.warmup_fraction=1\.5: must be in \[0, 1\)"),
    ("trainer.grad_clip=0", r"trainer\.grad_clip=0"),
    ("trainer.scheduler=linear", r"trainer\.scheduler='linear': must be one of"),
    ("optim.lr=0", r"optim\.lr=0"),
    ("optim.lr=nan", r"optim\.lr=nan"),
    ("width=0", r"width=0"),
    ("depth=-1", r"depth=-1"),
    ("min_accuracy=1.5", r"min_accuracy=1\.5: must be null or in \[0, 1\]"),
    ("task=regress", r"task='regress': must be one of"),
    ("loss=l1", r"loss='l1': must be one of"),
])
def test_bad_settings_name_the_key(train_cfg, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        run(train_cfg("model=statnn", override))
    assert "\n" not in str(info.value)


def test_train_script_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    done = subprocess.run([sys.executable, str(script), "debug=tiny", "trainer.batch_size=0",
                           f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == \
        "train.py: error: trainer.batch_size=0: must be an integer >= 1"
    assert "Traceback" not in done.stderr
