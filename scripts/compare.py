"""Train the quasi model and every baseline over seeds and accuracy thresholds; write a table.

    python scripts/compare.py experiment=agnews_quasi
    python scripts/compare.py experiment=agnews_quasi compare.seeds=[0,1,2,3,4]
    python scripts/compare.py debug=tiny compare.models=[statnn,flat_mlp] compare.seeds=[0,1]

Each (threshold, model, seed) is one ``neuralgraph_quasi.train.run`` in
``<output_dir>/t<threshold>/<model>/seed<seed>``; a finished one (metrics.json present) is
not rerun, and an interrupted one goes on from its ``last.ckpt``, so an interrupted
comparison resumes where it stopped. Writes ``results.md`` (Kendall tau mean
+- standard error, parameter counts, the quasi model's extra parameters in %) and
``results.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from neuralgraph_quasi.data._atomic import atomic_write_json, atomic_write_text
from neuralgraph_quasi.train import run

log = logging.getLogger(__name__)


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def table(results: dict, models: list[str], thresholds: list[float], reference: str | None,
          metric: str) -> str:
    """Markdown: one row per model, Kendall tau mean +- s.e. per threshold, parameters."""
    ref = results.get(reference, {}).get("num_params") if reference else None
    head = ["model", "params", f"extra vs {reference}" if ref else "extra"]
    head += [f"acc >= {int(round(t * 100))}%" for t in thresholds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        row = results.get(m, {})
        params = row.get("num_params")
        extra = f"{100 * (params - ref) / ref:+.1f}%" if params and ref else "-"
        cells = [m, f"{params:,}" if params else "-", extra]
        for t in thresholds:
            values = row.get("scores", {}).get(str(t), [])
            if not values:
                cells.append("n/a")
                continue
            mean, se = _mean_se(values)
            cells.append(f"{mean:.3f} ± {se:.3f}" if not math.isnan(se) else f"{mean:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nTest {metric}: mean ± standard error over seeds.\n"


def _record(results: dict, model: str, t: float, seed: int, metrics: dict, metric: str) -> None:
    """File one run's metrics under its model (and the trees it fitted, under ``trees``)."""
    entry = results.setdefault(model, {"scores": {}})
    entry["num_params"] = metrics["num_params"]
    entry["scores"].setdefault(str(t), []).append(metrics[f"test_{metric}"])
    entry.setdefault("by_seed", {}).setdefault(str(t), {})[str(seed)] = \
        metrics[f"test_{metric}"]
    entry.setdefault("dataset_size", {})[str(t)] = metrics["dataset_size"]
    if "alpha_eps" in metrics:
        entry.setdefault("alpha", {}).setdefault(str(t), []).append(
            {"eps": metrics["alpha_eps"], "scale_spread": metrics["alpha_scale_spread"],
             "gl_spread": metrics["alpha_gl_spread"]})
    if model == "statnn" and "trees_test_kendall_tau" in metrics:  # once per seed
        trees = results.setdefault("trees", {"scores": {}})
        trees["scores"].setdefault(str(t), []).append(metrics["trees_test_kendall_tau"])
        trees.setdefault("by_seed", {}).setdefault(str(t), {})[str(seed)] = \
            metrics["trees_test_kendall_tau"]


def paired_table(results: dict, models: list[str], thresholds: list[float],
                 references: list[str], metric: str) -> str:
    """Markdown: per model, the mean over seeds of its paired difference to each reference
    (same seed, same split) ± the standard error of those differences; a difference is
    marked established (*) only where it exceeds two paired standard errors."""
    if not references:
        return ""
    head = ["model"] + [f"− {r}, acc >= {int(round(t * 100))}%" for r in references
                        for t in thresholds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells = [m]
        for r in references:
            for t in thresholds:
                a = results.get(m, {}).get("by_seed", {}).get(str(t), {})
                b = results.get(r, {}).get("by_seed", {}).get(str(t), {})
                diffs = [a[k] - b[k] for k in sorted(a) if k in b]
                if m == r or not diffs:
                    cells.append("-")
                    continue
                mean, se = _mean_se(diffs)
                mark = "*" if len(diffs) > 1 and abs(mean) > 2 * se else ""
                cells.append(f"{mean:+.3f} ± {se:.3f}{mark}" if not math.isnan(se)
                             else f"{mean:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\nPaired differences of test {metric} (same seed and split),"
            " mean ± standard error over seeds; * where |mean| > 2 s.e. (otherwise: not "
            "established).\n")


def alpha_table(results: dict, models: list[str], thresholds: list[float]) -> str:
    """Markdown: the learned α of every quasi model (ε per kind, spread of the scales and
    of the GL factors), mean over seeds."""
    lines = []
    for m in models:
        for t in thresholds:
            runs = results.get(m, {}).get("alpha", {}).get(str(t), [])
            if not runs:
                continue
            n = len(runs)
            eps = {k: sum(r["eps"][k] for r in runs) / n for k in runs[0]["eps"]}
            spread = sum(r["scale_spread"] for r in runs) / n
            gl = {k: sum(r["gl_spread"][k] for r in runs) / n for k in ("M", "N")}
            lines.append(f"| {m} | {int(round(t * 100))}% | {eps['scale']:.3f} | {eps['qk']:.3f}"
                         f" | {eps['vo']:.3f} | {spread:.4f} | {gl['M']:.4f} | {gl['N']:.4f} |")
    if not lines:
        return ""
    head = ("\n| model | acc >= | ε scale | ε qk | ε vo | scale spread (std) | ‖M − I‖_F |"
            " ‖N − I‖_F |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(lines) + "\n\nα after training on the test set, mean over seeds.\n"


def _keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


@hydra.main(version_base="1.3", config_path="../configs", config_name="compare")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.output_dir)
    base = [o for o in HydraConfig.get().overrides.task
            if not o.split("=", 1)[0].lstrip("+~").startswith(("compare", "output_dir"))]
    models, seeds = list(cfg.compare.models), list(cfg.compare.seeds)
    thresholds = [float(t) for t in cfg.compare.thresholds]
    metric = {"predict": "kendall_tau", "classify": "accuracy", "edit": "mse"}[cfg.task]
    results: dict = {}
    for t in thresholds:
        for m in models:
            for s in seeds:
                run_dir = out / f"t{t:g}" / m / f"seed{s}"
                done = run_dir / "metrics.json"
                if done.exists():
                    metrics = json.loads(done.read_text())
                else:
                    # an interrupted run (Ctrl-C, or a time limit's SIGINT) goes on from its
                    # last checkpoint
                    resume = ([f"trainer.resume={run_dir}"]
                              if (run_dir / "last.ckpt").exists() else [])
                    run_cfg = compose("compare", overrides=[
                        *base, f"model={m}", f"seed={s}",
                        f"min_accuracy={t if t > 0 else 'null'}", f"output_dir={run_dir}",
                        *resume])
                    try:
                        metrics = run(run_cfg, cli_overrides=set(_keys(base)))
                    except ValueError as exc:  # e.g. an empty split at a high threshold
                        log.warning("t=%g %s seed %d: %s", t, m, s, exc)
                        continue
                _record(results, m, t, s, metrics, metric)
                print(f"t={t:g} {m} seed {s}: test {metric} {metrics[f'test_{metric}']:.4f}")
    order = [*models, *(name for name in results if name not in models)]  # + trees
    text = table(results, order, thresholds, cfg.compare.get("reference"), metric)
    text += "\n" + paired_table(results, order, thresholds,
                                 [r for r in (cfg.compare.get("reference"), "statnn")
                                  if r in results], metric)
    text += alpha_table(results, order, thresholds)
    sizes = next(iter(results.values()), {}).get("dataset_size", {})
    header = (f"# {cfg.dataset.name}: {cfg.task}, seeds {seeds}\n\n"
              f"Zoo: {cfg.dataset.root} (graphs after each threshold: {sizes}).\n\n")
    atomic_write_text(out / "results.md", header + text)
    atomic_write_json(out / "results.json", results)
    print(header + text)
    print(f"written: {out / 'results.md'}")


if __name__ == "__main__":
    main()
