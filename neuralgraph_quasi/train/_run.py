"""``run(cfg) -> metrics``: one training run, from the zoo on disk to ``metrics.json``.

The steps, in order: resolve the device (and the larger GPU defaults), open the zoo
(generated first when absent) as train/val/test splits, build the task and the model
(shapes injected from the data), train with :class:`~neuralgraph_quasi.train.Trainer`,
test the best checkpoint, train the STATNN baseline on the same split, evaluate under
random symmetries (``eval.augment``), draw the plots and write ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..data import load_zoo
from ..data._atomic import atomic_write_json
from ..symmetry import RandomSymmetry
from ._build import build_model, num_trainable, runtime_shapes
from ._checkpoint import CheckpointError, load_checkpoint
from ._distributed import Dist, init_distributed
from ._loop import Trainer, evaluate
from ._plots import plot_alpha, plot_learning_curves, plot_predictions
from ._predict import zoo_architectures
from ._report import alpha_report, alpha_summary, paired_bootstrap, tree_baselines
from ._rundir import check_resume_identity, claim_output_dir, release_output_dir
from ._tasks import TASKS, Task
from ._validate import validate_config

__all__ = ["run", "resolve_device", "apply_gpu_defaults", "make_task", "open_splits"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_gpu_defaults(cfg: DictConfig, skip: set[str] | frozenset = frozenset()) -> list[str]:
    """On CUDA, apply ``cfg.gpu`` (larger zoo and model): ``gpu.overrides`` (``key=value``
    strings) and ``gpu.num_models[dataset.name]`` (the zoo then lives in
    ``<root>_<num_models>``, so it never clashes with the CPU zoo). Keys in ``skip`` (those
    given on the command line) are left alone. Returns the overrides applied."""
    gpu = cfg.get("gpu")
    if not gpu:
        return []
    applied = []
    for item in gpu.get("overrides") or []:
        key, _, value = str(item).partition("=")
        if key not in skip:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
            applied.append(f"{key}={value}")
    sizes = gpu.get("num_models") or {}
    name = cfg.dataset.get("name")
    if name in sizes and "dataset.num_models" not in skip:
        cfg.dataset.num_models = int(sizes[name])
        applied.append(f"dataset.num_models={sizes[name]}")
        if "dataset.root" not in skip:
            cfg.dataset.root = f"{cfg.dataset.root}_{int(sizes[name])}"
            applied.append(f"dataset.root={cfg.dataset.root}")
    return applied


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_task(cfg: DictConfig, train_set) -> Task:
    """The task ``cfg.task`` names, sized from the training split."""
    name = cfg.task
    if name == "predict":
        return TASKS["predict"](loss=cfg.get("loss", "bce"))
    if name == "classify":
        return TASKS["classify"](out_dim=int(train_set.targets.max()) + 1)
    if name == "edit":
        from ._edit import EditINR

        return EditINR(train_set, **OmegaConf.to_container(cfg.edit, resolve=True))
    raise ValueError(f"task must be 'predict', 'classify' or 'edit', got {name!r}")


def open_splits(cfg: DictConfig, dist: Dist, **overrides) -> dict[str, Any]:
    """The zoo's train/val/test splits; the main process generates a missing zoo first."""
    if dist.main:
        splits = {"train": load_zoo(cfg.dataset, "train", **overrides)}
    dist.barrier()
    if not dist.main:
        splits = {"train": load_zoo(cfg.dataset, "train", generate=False, **overrides)}
    for split in ("val", "test"):
        splits[split] = load_zoo(cfg.dataset, split, generate=False, **overrides)
    empty = [name for name, data in splits.items() if len(data) == 0]
    if empty:
        raise ValueError(f"the {'/'.join(empty)} split(s) of {cfg.dataset.name} are empty "
                         f"({len(splits['train'])} training graphs): use a larger zoo or a "
                         "lower accuracy threshold")
    return splits


def _corpus(root: str) -> str | None:
    """What a generated zoo records about its corpus (``generator.json``), if anything."""
    manifest = Path(root) / "generator.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        if record.get("corpus"):
            return str(record["corpus"])
    readme = Path(root) / "README.md"
    if readme.is_file():
        for line in readme.read_text().splitlines():
            if "corpus" in line.lower():
                return line.strip()
    return None


def _train_one(name: str, model_cfg, cfg: DictConfig, task: Task, splits, directory: Path,
               device, dist: Dist, config: dict, resume: bool, progress: bool):
    sample = splits["train"][0]
    runtime = runtime_shapes(sample, task.out_dim, task.model_task)
    model = build_model(model_cfg, runtime)
    optimizer = instantiate(cfg.optim)
    trainer_cfg = cfg.trainer
    if name == "baseline" and cfg.trainer.get("baseline_epochs"):
        trainer_cfg = cfg.trainer.copy()
        trainer_cfg.epochs = int(cfg.trainer.baseline_epochs)
    extra = {"runtime": runtime, "model_config": OmegaConf.to_container(model_cfg, resolve=True),
             "task": str(cfg.task), "architectures": zoo_architectures(splits["train"])}
    trainer = Trainer(model, task, splits["train"], splits["val"], directory, optimizer,
                      trainer_cfg, device, dist, config, seed=int(cfg.seed), name=name,
                      extra=extra)
    start_step = 0
    # α over the whole test split before training, for the before/after figure
    trainer.alpha_init = alpha_report(model, splits["test"], device) \
        if name == "model" and not resume and dist.main else {}
    if resume:
        last = directory / "last.ckpt"
        if not last.exists() and name != "model":
            log.info("%s: no checkpoint in %s, training from scratch", name, directory)
        else:
            trainer.resume(last)
            start_step = trainer.step
    trainer.fit(progress=progress)
    trainer.load_best()
    return trainer, start_step


def run(cfg: DictConfig, cli_overrides: set[str] | frozenset = frozenset()) -> dict[str, Any]:
    """Train and evaluate the model ``cfg`` describes; return (and write) its metrics.

    Args:
        cfg: the composed ``configs/train.yaml`` (hydra), or any config of that shape.
        cli_overrides: keys given on the command line, which the GPU defaults leave alone.

    Returns:
        the content of ``<output_dir>/metrics.json``.
    """
    started = time.perf_counter()
    cfg = cfg.copy()
    device = resolve_device(str(cfg.device))
    with open_dict(cfg):
        specific = (cfg.get("per_dataset") or {}).get(cfg.dataset.name)
        if specific:
            cfg.dataset = OmegaConf.merge(cfg.dataset, specific)
        applied = apply_gpu_defaults(cfg, cli_overrides) if device.type == "cuda" else []
        resume = cfg.trainer.get("resume")
        if resume:
            cfg.output_dir = str(resume)
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    out = Path(cfg.output_dir)
    if resume:
        last = out / "last.ckpt"
        if not last.exists():
            raise CheckpointError(f"trainer.resume={resume}: no last.ckpt in that directory")
        check_resume_identity(load_checkpoint(last)["config"],
                              OmegaConf.to_container(cfg, resolve=True), last)
    if applied:
        log.info("GPU defaults applied: %s", ", ".join(applied))
    dist = init_distributed(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not resume:  # a directory of its own, even when another run started the same second
        out = claim_output_dir(out, dist)
        with open_dict(cfg):
            cfg.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":  # TF32 matrix products (Ampere and later) unless tf32=false
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.trainer.get("tf32", True))
        torch.backends.cudnn.allow_tf32 = bool(cfg.trainer.get("tf32", True))
    seed_everything(int(cfg.seed) + dist.rank)
    config = OmegaConf.to_container(cfg, resolve=True)
    progress = bool(cfg.trainer.get("progress", True))

    overrides = {}
    if cfg.get("min_accuracy") is not None:
        overrides["min_accuracy"] = float(cfg.min_accuracy)
    splits = open_splits(cfg, dist, **overrides)
    task = make_task(cfg, splits["train"])
    trainer, start_step = _train_one("model", cfg.model, cfg, task, splits, out, device, dist,
                                     config, bool(resume), progress)
    eval_bs = int(cfg.trainer.get("eval_batch_size", cfg.trainer.batch_size))
    amp = trainer.amp  # trainer.amp resolved (auto|true|false)
    metrics: dict[str, Any] = {}
    if dist.main:
        val, _, _ = evaluate(trainer.module, task, splits["val"], device, eval_bs, amp)
        test, pred, true = evaluate(trainer.module, task, splits["test"], device, eval_bs, amp)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics.update({f"test_{k}": v for k, v in test.items()})
    histories = {"model": trainer.history}
    baseline = None
    if cfg.get("train_baseline") and cfg.get("baseline") is not None and task.out_dim \
            and cfg.task != "edit":
        seed_everything(int(cfg.seed) + dist.rank)
        baseline, _ = _train_one("baseline", cfg.baseline, cfg, task, splits, out / "baseline",
                                 device, dist, config, bool(resume), progress)
        histories["baseline"] = baseline.history
        if dist.main:
            bval = evaluate(baseline.module, task, splits["val"], device, eval_bs, amp)[0]
            btest, bpred, _ = evaluate(baseline.module, task, splits["test"], device, eval_bs,
                                       amp)
            metrics.update({f"baseline_val_{k}": v for k, v in bval.items()})
            metrics.update({f"baseline_test_{k}": v for k, v in btest.items()})
            metrics["baseline_num_params"] = num_trainable(baseline.module)
    if not dist.main:
        dist.barrier()
        return {}

    augment = cfg.get("eval", {}).get("augment")
    if augment:
        metrics["augment"] = _evaluate_augmented(cfg, augment, task, trainer, baseline, device,
                                                 eval_bs, amp, overrides)
    metrics.update({
        "task": str(cfg.task), "dataset": str(cfg.dataset.name),
        "model": str(cfg.model._target_).rsplit(".", 1)[-1],
        "num_params": num_trainable(trainer.module),
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": trainer.train_time,
        "amp": trainer.amp, "compiled": trainer.compile,
        "train_graphs_per_s": trainer.graphs_per_s,
        "dataset_size": sum(len(s) for s in splits.values()),
        "split_sizes": {k: len(s) for k, s in splits.items()},
        "corpus": _corpus(str(cfg.dataset.root)),
        "steps": trainer.step, "epochs": trainer.epoch, "best_epoch": trainer.best_epoch,
        "resumed_from_step": start_step if resume else None,
        "device": str(device), "world_size": dist.world_size,
        "seed": int(cfg.seed), "min_accuracy": cfg.get("min_accuracy"),
        "gpu_defaults": applied, "run_dir": str(out),
    })
    alpha_end = alpha_report(trainer.module, splits["test"], device, eval_bs)
    metrics.update(alpha_summary(alpha_end))
    if trainer.alpha_init:
        metrics["alpha_init"] = alpha_summary(trainer.alpha_init)
    bpred = bpred if baseline is not None else None
    if cfg.task == "predict":
        metrics.update(_compare(cfg, splits, device, pred, true, bpred))
    if cfg.get("plots", True):
        _plots(out, cfg, task, trainer, splits, histories, pred, true, bpred, alpha_end)
    atomic_write_json(out / "metrics.json", metrics)
    log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items()
                                        if isinstance(v, int | float)}, default=str))
    release_output_dir()
    dist.barrier()
    return metrics


def _evaluate_augmented(cfg, augment, task, trainer, baseline, device, eval_bs, amp,
                        overrides) -> dict[str, dict[str, float]]:
    """Test metrics with every test graph moved by a random group element, for each
    ``scale_exponents`` entry ``k`` (positive scales in U[1, 10^k])."""
    augment = OmegaConf.to_container(augment, resolve=True) if isinstance(augment, DictConfig) \
        else dict(augment)
    kinds = augment.get("kinds")
    results = {}
    for k in augment.get("scale_exponents", [1]):
        transform = RandomSymmetry(kinds=kinds, scale_range=(1.0, 10.0 ** float(k)),
                                   generator=torch.Generator().manual_seed(
                                       int(augment.get("seed", 0))))
        test = load_zoo(cfg.dataset, "test", generate=False, transform=transform, **overrides)
        row = {f"test_{m}": v for m, v in
               evaluate(trainer.module, task, test, device, eval_bs, amp)[0].items()}
        if baseline is not None:
            transform.generator.manual_seed(int(augment.get("seed", 0)))
            row.update({f"baseline_test_{m}": v for m, v in
                        evaluate(baseline.module, task, test, device, eval_bs, amp)[0].items()})
        results[f"1e{k}"] = row
    return results


def _compare(cfg, splits, device, pred, true, bpred) -> dict[str, Any]:
    """The model against the statistics baselines on the same test split: a paired
    bootstrap of ``τ(model) − τ(STATNN)`` (``tau_gain_ci``, ``beats_baseline`` when the 95 %
    interval lies above 0), and trees on STATNN's features (``trees_*``)."""
    metrics: dict[str, Any] = {}
    seed = int(cfg.seed)
    if bpred is not None:
        gain = paired_bootstrap(pred, bpred, true, seed=seed)
        metrics["tau_gain"] = gain["estimate"]
        metrics["tau_gain_ci"] = [gain["low"], gain["high"]]
        metrics["beats_baseline"] = bool(gain["low"] > 0)
    if cfg.get("trees", True):
        trees = tree_baselines(splits["train"], splits["val"], splits["test"], device, seed)
        best = trees[trees["best"]]
        metrics.update({
            "trees_test_kendall_tau": best["test_kendall_tau"],
            "trees_val_kendall_tau": best["val_kendall_tau"], "trees_model": trees["best"],
            "trees": {name: {k: v for k, v in trees[name].items() if k != "test_pred"}
                      for name in ("hist_gradient_boosting", "random_forest")}})
        gain = paired_bootstrap(pred, best["test_pred"], true, seed=seed)
        metrics["tau_gain_vs_trees"] = gain["estimate"]
        metrics["tau_gain_vs_trees_ci"] = [gain["low"], gain["high"]]
    return metrics


def _plots(out, cfg, task, trainer, splits, histories, pred, true, bpred, alpha_end) -> None:
    plot_learning_curves(histories, out / "learning_curves.png", task.score_name)
    if cfg.task == "predict":
        tau = task.metrics(pred, true)["kendall_tau"]
        plot_predictions(pred, true, out / "predictions_test.png",
                         f"{cfg.dataset.name} test: Kendall tau {tau:.3f}", bpred)
    if alpha_end:
        plot_alpha(alpha_end, out / "alpha.png", getattr(trainer, "alpha_init", None))
