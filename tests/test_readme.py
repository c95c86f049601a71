"""README's tour runs as written, and its first screen names the commands CI runs."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_tour_runs(tmp_path, monkeypatch):
    text = README.read_text()
    tour = text.split("## A short tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (tour)", "exec"), namespace)
    assert tuple(namespace["net"](namespace["batch"]).shape) == (2, 1)


def test_first_screen_commands_are_those_of_ci():
    first_screen = "\n".join(README.read_text().splitlines()[:30])
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python scripts/train.py dataset=agnews_tf" in first_screen
    assert 'pip install -e ".[test]"' in first_screen and 'pip install -e ".[test]"' in ci
    assert "python -m pytest -q" in first_screen and "python -m pytest -q" in ci


def test_ci_tests_the_oldest_supported_torch_geometric():
    root = README.parent
    pyg = re.search(r'"torch-geometric\s*>=\s*([0-9.]+)\s*,\s*<\s*[0-9.]+"',
                    (root / "pyproject.toml").read_text())
    assert pyg, "pyproject.toml must declare torch-geometric as a range >=oldest,<cap"
    ci = (root / ".ci" / "run").read_text()
    assert f"OLDEST_PYG={pyg.group(1)} " in ci
    assert 'pip install "torch-geometric==${OLDEST_PYG}"' in ci
    assert ci.count("python -m pytest -q") == 2
