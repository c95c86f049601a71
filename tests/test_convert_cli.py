"""scripts/convert.py: saved modules and state_dicts to graph files; clean one-line errors."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from neuralgraph_quasi import models, to_graph, to_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert.py"

_spec = importlib.util.spec_from_file_location("convert_cli", SCRIPT)
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)


class Residual(nn.Module):
    """A traced (custom) model: the CLI converts it through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(h + self.b(h)))


def _classifier() -> models.TransformerClassifier:
    torch.manual_seed(0)
    return models.TransformerClassifier(dim=8, depth=1, heads=2, hidden=12, num_classes=3)


ARCH = ["--arch", "neuralgraph_quasi.models.TransformerClassifier", "--arch-kwargs",
        '{"dim": 8, "depth": 1, "heads": 2, "hidden": 12, "num_classes": 3}']


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = convert_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_graph_file(path: Path, model: nn.Module) -> None:
    graph = torch.load(path, weights_only=True)
    back = to_model(graph, model)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_state_dict_with_named_class(tmp_path, capsys):
    model = _classifier()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    code, out, err = _main(capsys, tmp_path / "state.pt", "--out", tmp_path / "g.pt",
                           "--draw", tmp_path / "g.png", *ARCH)
    assert code == 0, err
    assert "nodes" in out
    _assert_graph_file(tmp_path / "g.pt", model)
    assert (tmp_path / "g.png").stat().st_size > 0


def test_state_dict_with_factory_and_kwargs(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.siren(2, 8, 2, 1)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    code, _, err = _main(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "g.pt",
                         "--arch", "neuralgraph_quasi.models:siren",
                         "--arch-kwargs", '{"in_features": 2, "hidden": 8}')
    assert code == 0, err
    _assert_graph_file(tmp_path / "g.pt", model)


def test_pickled_module_needs_trust_pickle(tmp_path, capsys):
    model = Residual()
    torch.save(model, tmp_path / "whole.pt")
    code, out, err = _main(capsys, tmp_path / "whole.pt", "--out", tmp_path / "g.pt")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--trust-pickle" in err and "executes code" in err
    assert not (tmp_path / "g.pt").exists()
    code, _, err = _main(capsys, tmp_path / "whole.pt", "--out", tmp_path / "g.pt",
                         "--trust-pickle")
    assert code == 0, err
    _assert_graph_file(tmp_path / "g.pt", model)
    graph = torch.load(tmp_path / "g.pt", weights_only=True)
    assert torch.equal(graph.edge_attr, to_graph(model).edge_attr)


def _damaged(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    torch.save(_classifier().state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"not a checkpoint")
    return path


@pytest.mark.parametrize("case, pattern", [
    ("truncated", "corrupt or truncated"),
    ("garbage", "corrupt or truncated"),
    ("missing", "no such file"),
    ("wrong-keys", "does not fit .*Missing key"),
    ("wrong-shape", "does not fit .*size mismatch"),
    ("no-arch", "--arch"),
    ("bad-arch", "--arch 'neuralgraph_quasi.models.NoSuchNet'"),
    ("bad-kwargs", "--arch-kwargs is not valid JSON"),
    ("unconvertible", "cannot convert Unsupported: fx node 'exp'"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, case, pattern):
    out_file = tmp_path / "g.pt"
    argv = list(ARCH)
    if case in ("truncated", "garbage"):
        model_file = _damaged(tmp_path, case)
    elif case == "missing":
        model_file = tmp_path / "nothing.pt"
    elif case == "wrong-keys":
        model_file = tmp_path / "s.pt"
        state = _classifier().state_dict()
        state.pop("classifier.fc2.bias")
        torch.save(state, model_file)
    elif case == "wrong-shape":
        model_file = tmp_path / "s.pt"
        state = _classifier().state_dict()
        state["classifier.fc2.bias"] = torch.zeros(5)
        torch.save(state, model_file)
    else:
        model_file = tmp_path / "s.pt"
        torch.save(_classifier().state_dict(), model_file)
        if case == "no-arch":
            argv = []
        elif case == "bad-arch":
            argv = ["--arch", "neuralgraph_quasi.models.NoSuchNet"]
        elif case == "bad-kwargs":
            argv = [ARCH[0], ARCH[1], "--arch-kwargs", "{dim: 8"]
        elif case == "unconvertible":
            argv = ["--arch", f"{__name__}:Unsupported"]
            torch.save(Unsupported().state_dict(), model_file)
    code, out, err = _main(capsys, model_file, "--out", out_file, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convert.py: error: ")
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_file.exists()


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        return torch.exp(self.a(x))


def test_command_line_exit_code_and_output(tmp_path):
    torch.save(_classifier().state_dict(), tmp_path / "s.pt")
    ok = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "s.pt"), "--out",
                         str(tmp_path / "g.pt"), *ARCH], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "g.pt").exists()
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "s.pt"), "--out",
                          str(tmp_path / "h.pt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--arch" in bad.stderr


def test_outputs_never_overwrite_the_input_or_each_other(tmp_path, capsys):
    state = tmp_path / "state.pt"
    torch.save(_classifier().state_dict(), state)
    original = state.read_bytes()
    cases = [
        (["--out", state], r"--out .*state\.pt is the input"),
        (["--out", tmp_path / "g.pt", "--draw", state], r"--draw .*state\.pt is the input"),
        (["--out", tmp_path / "same.pt", "--draw", tmp_path / "same.pt"],
         r"--out and --draw are the same file"),
        (["--out", tmp_path], r"--out .* is a directory"),
        (["--out", tmp_path / "g.pt", "--draw", tmp_path / "g.xyz"],
         r"--draw .*g\.xyz: unknown image format 'xyz'"),
        (["--out", tmp_path / "g.pt", "--draw", tmp_path / "pic"],
         r"--draw .*pic: unknown image format ''"),
    ]
    for extra, message in cases:
        code, out, err = _main(capsys, state, *extra, *ARCH)
        assert code == 2 and re.search(message, err), (extra, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert state.read_bytes() == original
    assert not (tmp_path / "g.pt").exists() and not (tmp_path / "same.pt").exists()
    # through a different spelling of the same path
    code, _, err = _main(capsys, state, "--out", tmp_path / "." / "state.pt", *ARCH)
    assert code == 2 and "is the input" in err and state.read_bytes() == original


def test_outputs_are_written_atomically(tmp_path, capsys, monkeypatch):
    state = tmp_path / "state.pt"
    torch.save(_classifier().state_dict(), state)
    graph_file, png = tmp_path / "g.pt", tmp_path / "g.png"
    graph_file.write_bytes(b"old graph")
    png.write_bytes(b"old png")

    def failing_draw(graph, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")  # a writer interrupted half-way
        raise OSError("disk full")

    monkeypatch.setattr(convert_cli, "draw", failing_draw)
    code, _, err = _main(capsys, state, "--out", graph_file, "--draw", png, *ARCH)
    assert code == 2 and "disk full" in err
    assert png.read_bytes() == b"old png"  # untouched: no half-written picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g.pt", "state.pt"]
    monkeypatch.undo()
    code, out, err = _main(capsys, state, "--out", graph_file, "--draw", png, *ARCH)
    assert code == 0, err
    graph = torch.load(graph_file, weights_only=True)
    assert graph.num_nodes > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g.pt", "state.pt"]


def test_graph_files_load_weights_only_after_importing_the_package(tmp_path):
    """What docs/graph.md says: torch alone refuses the file; after the import it loads."""
    torch.save(to_graph(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))),
               tmp_path / "g.pt")
    code = ("import sys, torch\n"
            "def load():\n"
            "    try:\n"
            "        return f'loaded {torch.load(sys.argv[1], weights_only=True).num_nodes}'\n"
            "    except Exception as e:\n"
            "        return f'refused {\"Unsupported global\" in str(e)}'\n"
            "print(load())\n"
            "import neuralgraph_quasi\n"
            "print(load())\n")
    done = subprocess.run([sys.executable, "-c", code, tmp_path / "g.pt"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:2] == ["refused True", "loaded 6"], done.stderr[-2000:]
