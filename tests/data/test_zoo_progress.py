"""Zoo generation: the progress bar stays within its total; Ctrl-C gives one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from neuralgraph_quasi.data.generate._stacked import run_chunks

ROOT = Path(__file__).resolve().parents[2]


def test_progress_never_exceeds_its_total(capsys):
    chunks = [[{}] * 7, [{}] * 24, [{}] * 24]
    steps = 30

    def train(c, on_step):
        for _ in range(steps):  # fractions that sum to slightly more than the chunk size
            on_step(len(chunks[c]) / steps)
        return c

    saved = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_chunks(chunks, [0, 1, 2], train, lambda c, r: saved.append(c), num_models=55,
                   device=torch.device("cpu"), workers=1, progress=True, desc="test zoo")
    assert sorted(saved) == [0, 1, 2]
    assert not [w for w in caught if "clamping frac" in str(w.message)], \
        [str(w.message) for w in caught]
    assert "55/55" in capsys.readouterr().err


CTRL_C = """
import runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
import torch
import neuralgraph_quasi.data.zoos as zoos
from neuralgraph_quasi.data.generate._stacked import run_chunks

def fake_make_zoo(cfg):  # the real run_chunks: threads training chunks until stopped
    def train(c, on_step):
        sys.stdout.write("training\\n")  # one write: two threads' prints can interleave
        sys.stdout.flush()
        while True:
            time.sleep(0.01)
            on_step(0.001)
    run_chunks([[{}] * 4, [{}] * 4], [0, 1], train, lambda c, r: None, num_models=8,
               device=torch.device("cpu"), workers=2, progress=False, desc="zoo")

zoos.make_zoo = fake_make_zoo
script, out = sys.argv[1:]
sys.argv = [script, f"paths.output_dir={out}", f"hydra.run.dir={out}/run"]
runpy.run_path(script, run_name="__main__")
"""


def test_ctrl_c_during_make_zoo_prints_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, str(ROOT / "scripts" / "make_zoo.py"),
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().startswith("training")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("make_zoo.py: interrupted")
