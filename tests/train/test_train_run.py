"""run(cfg) end to end on tiny zoos: metrics, outputs, every experiment config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from neuralgraph_quasi.train import apply_gpu_defaults, load_run, run

#: generating even a tiny zoo of these takes ~25 s on 2 cores: run with -m slow
SLOW_EXPERIMENTS = {"mnist_quasi"}
EXPERIMENTS = [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem in SLOW_EXPERIMENTS
                            else []) for p in sorted(
    (Path(__file__).resolve().parents[2] / "configs/experiment").glob("*.yaml"))]
REQUIRED = ("val_kendall_tau", "test_kendall_tau", "test_r2", "baseline_test_kendall_tau",
            "num_params", "wall_time_s", "train_graphs_per_s", "dataset_size")


def _finite(metrics: dict, keys) -> None:
    for key in keys:
        assert key in metrics, key
        assert math.isfinite(float(metrics[key])), (key, metrics[key])


def test_debug_run_writes_metrics_checkpoints_logs_and_plots(train_cfg):
    cfg = train_cfg("model=statnn")
    metrics = run(cfg)
    _finite(metrics, REQUIRED)
    out = Path(cfg.output_dir)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["corpus"] and "synthetic" in metrics["corpus"]
    assert metrics["dataset_size"] == 24 and metrics["steps"] == 6  # 15 train runs, batch 4
    for name in ("last.ckpt", "best.ckpt", "log.csv", "learning_curves.png",
                 "predictions_test.png", "baseline/best.ckpt"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 2  # header + 2 epochs
    assert "1e1" in metrics["augment"]
    assert 0.0 <= metrics["test_mse"] < 1.0


def test_load_run_predicts_a_members_accuracy_from_its_module(train_cfg):
    from neuralgraph_quasi import to_model
    from neuralgraph_quasi.data import load_zoo

    cfg = train_cfg("model=statnn", "train_baseline=false", "eval.augment=null", "plots=false")
    run(cfg)
    predictor = load_run(cfg.output_dir)
    test = load_zoo(cfg.dataset, "test", generate=False)
    module = to_model(test[0], test.make_model(test[0]))
    one = predictor.predict(module)
    both = predictor.predict([module, to_model(test[1], test.make_model(test[1]))])
    assert 0.0 < one < 1.0 and both.shape == (2,)
    assert abs(float(both[0]) - one) < 1e-5


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_runs_tiny(experiment, train_cfg):
    cfg = train_cfg(f"experiment={experiment}", "trainer.max_steps=3")
    metrics = run(cfg)
    key = {"predict": "test_kendall_tau", "classify": "test_accuracy",
           "edit": "test_mse"}[cfg.task]
    _finite(metrics, (key, "num_params", "wall_time_s", "dataset_size"))
    assert 0 < metrics["steps"] <= 3
    if cfg.model._target_.endswith("QuasiGNN") and cfg.task != "edit":
        assert (Path(cfg.output_dir) / "alpha.png").exists()


def test_gpu_defaults_leave_command_line_keys_alone(train_cfg):
    cfg = train_cfg("dataset=agnews_tf", "width=48", debug=None)
    root = cfg.dataset.root
    applied = apply_gpu_defaults(cfg, skip={"width"})
    assert cfg.model.hidden_dim == 48 and cfg.depth == 4 and cfg.trainer.batch_size == 64
    assert cfg.dataset.num_models == 10000 and cfg.dataset.root == f"{root}_10000"
    assert "dataset.num_models=10000" in applied


def test_zoo_loader_batches_equal_pyg_collation(train_cfg):
    from neuralgraph_quasi.data import load_zoo
    from neuralgraph_quasi.graph import collate
    from neuralgraph_quasi.train._batches import ZooLoader

    cfg = train_cfg()
    data = load_zoo(cfg.dataset, "train")
    positions = torch.tensor([3, 0, 5])
    fast = ZooLoader(data, 3).batch(positions)
    slow = collate([data[int(i)] for i in positions])
    for key in slow.keys():
        a, b = slow[key], fast[key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


MODELS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs/model")
                .glob("*.yaml"))


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_builds_from_the_composed_config(name, train_cfg):
    """Hydra hands over struct-mode configs: each model config must build from one as it is
    (a regression: ``large_gnn``'s ``match_params`` could not be popped)."""
    from neuralgraph_quasi import to_graph
    from neuralgraph_quasi.models import TransformerClassifier as Classifier
    from neuralgraph_quasi.train import build_model, num_trainable, runtime_shapes

    cfg = train_cfg(f"model={name}")
    runtime = runtime_shapes(to_graph(Classifier()), out_dim=1, task="predict")
    model = build_model(cfg.model, runtime)
    assert num_trainable(model) > 0
    if name == "large_gnn":  # the smallest width with at least the quasi model's parameters
        quasi = num_trainable(build_model(train_cfg("model=quasi_gnn").model, runtime))
        plain = {**OmegaConf.to_container(cfg.model, resolve=True), "match_params": None}
        counts = [num_trainable(build_model({**plain, "hidden_dim": w}, runtime))
                  for w in range(cfg.width, cfg.width + 8)]
        first = next(c for c in counts if c >= quasi)
        assert num_trainable(model) == first > quasi > counts[0]
