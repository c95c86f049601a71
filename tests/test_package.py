"""The package namespace: subpackages reachable as attributes without importing them first,
and only the conversion API imported by ``import neuralgraph_quasi``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAZY = ("symmetry", "nn", "data", "train", "testing")

# Runs in a fresh interpreter: nothing imported by other tests can hide a missing import.
_SCRIPT = """
import json, sys
import torch
import neuralgraph_quasi as nq
eager = sorted(m for m in sys.modules if m.startswith("neuralgraph_quasi."))
g = nq.to_graph(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                    torch.nn.Linear(4, 2)).double())
element = nq.symmetry.sample(g, torch.Generator().manual_seed(0), kinds=["permutation"])
moved = nq.symmetry.act(element, g)
print(json.dumps({
    "eager": eager,
    "moved_differs": not torch.equal(moved.edge_attr, g.edge_attr),
    "attrs": {name: getattr(nq, name).__name__ for name in
              ("graph", "symmetry", "nn", "data", "train", "testing", "models")},
    "file": nq.__file__,
}))
"""


@pytest.fixture(scope="module")
def fresh():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dotted_subpackages_work_without_importing_them(fresh):
    assert Path(fresh["file"]).resolve().parent == ROOT / "neuralgraph_quasi"
    assert fresh["moved_differs"]
    assert fresh["attrs"] == {name: f"neuralgraph_quasi.{name}" for name in
                              ("graph", "symmetry", "nn", "data", "train", "testing", "models")}


def test_import_does_not_load_the_heavy_subpackages(fresh):
    loaded = {m.split(".")[1] for m in fresh["eager"]}
    assert not loaded & set(LAZY), sorted(loaded & set(LAZY))


def test_unknown_attribute_names_the_package():
    import neuralgraph_quasi as nq

    with pytest.raises(AttributeError, match="module 'neuralgraph_quasi' has no attribute "
                                             "'symetry'"):
        nq.symetry  # noqa: B018
