"""load_run(...).predict and scripts/predict.py refuse what the run was not trained on, and
every bad input gives one line."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from neuralgraph_quasi import models, to_model
from neuralgraph_quasi.data import load_zoo
from neuralgraph_quasi.train import CheckpointError, load_run, run
from neuralgraph_quasi.train._predict import ArchitectureError

ROOT = Path(__file__).resolve().parents[2]
FAST = ("model=statnn", "train_baseline=false", "eval.augment=null", "plots=false",
        "trainer.epochs=1")


def _predict_main():
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "scripts/predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def trained(train_cfg, tmp_path):
    cfg = train_cfg(*FAST)
    run(cfg)
    test = load_zoo(cfg.dataset, "test", generate=False)
    member = to_model(test[0], test.make_model(test[0]))
    torch.save(member, tmp_path / "member.pt")
    return Path(cfg.output_dir), member


def call(argv, capsys) -> tuple[int, str, str]:
    main = _predict_main()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_other_architectures_are_refused_naming_what_differs(trained):
    run_dir, member = trained
    predictor = load_run(run_dir)
    assert 0.0 < predictor.predict(member) < 1.0
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ArchitectureError, match=r"not an architecture .* parameter tensors"):
        predictor.predict(mlp)
    wide = models.TransformerClassifier(num_classes=4, dim=64)
    with pytest.raises(ArchitectureError, match=r"parameter .* shape \[.*64"):
        predictor.predict(wide)
    heads = models.TransformerClassifier(num_classes=4, heads=4)  # same parameter shapes
    with pytest.raises(ArchitectureError, match=r"it has 8 attention heads, the zoo's networks 4"):
        predictor.predict(heads)
    deep = models.TransformerClassifier(num_classes=4, depth=3)
    with pytest.raises(ArchitectureError, match=r"parameter tensors"):
        predictor.edit(deep) if predictor.task == "edit" else predictor.predict(deep)
    other_classes = models.TransformerClassifier(num_classes=7)
    with pytest.raises(ArchitectureError, match=r"shape \[7"):
        predictor.predict([member, other_classes])
    nan = copy.deepcopy(member)
    with torch.no_grad():
        next(nan.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite"):
        predictor.predict(nan)


def test_predict_script_options_and_one_line_errors(trained, tmp_path, capsys):
    run_dir, member = trained
    model = tmp_path / "member.pt"
    code, out, err = call([f"run={run_dir}", f"model={model}", "checkpoint=last.ckpt",
                           "device=cpu", f"out={tmp_path / 'pred.json'}"], capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "pred.json").read_text())
    assert "predicted accuracy" in out and 0 < written["predicted_accuracy"] < 1
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), tmp_path / "mlp.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(member.state_dict(), tmp_path / "state.pt")
    nan = copy.deepcopy(member)
    with torch.no_grad():
        next(nan.parameters())[0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    cases = {
        f"model={tmp_path / 'mlp.pt'}": "not an architecture",
        f"model={tmp_path / 'missing.pt'}": "no such file",
        f"model={tmp_path / 'junk.pt'}": "not a readable torch file",
        f"model={tmp_path / 'tensor.pt'}": "holds a Tensor",
        f"model={tmp_path / 'state.pt'}": "state_dict",
        f"model={tmp_path / 'nan.pt'}": "non-finite",
    }
    for arg, message in cases.items():
        code, out, err = call([f"run={run_dir}", arg], capsys)
        assert code == 2 and message in err, (arg, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for argv, message in (([f"run={run_dir}", f"model={model}", "device=nonsense"], "device"),
                          ([f"run={run_dir}", f"model={model}", "checkpoint=nope.ckpt"],
                           "nope.ckpt"),
                          ([f"run={run_dir}", f"model={model}", f"out={model}"], "input")):
        code, out, err = call(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_of_an_older_model_definition_is_one_line(trained, tmp_path):
    run_dir, _ = trained
    state = torch.load(run_dir / "best.ckpt", weights_only=False)
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3, 3)
    torch.save(state, run_dir / "old.ckpt")
    with pytest.raises(CheckpointError, match=rf"old\.ckpt.*{key}") as info:
        load_run(run_dir, "old.ckpt")
    assert "\n" not in str(info.value)
