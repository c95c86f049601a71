"""Train a metanetwork on a model zoo and evaluate it (generating the zoo first if absent).

    python scripts/train.py dataset=agnews_tf
    python scripts/train.py experiment=cnn_zoo_scale
    python scripts/train.py debug=tiny                       # seconds, on CPU
    python scripts/train.py trainer.resume=outputs/train/agnews_tf/<run>
    torchrun --nproc_per_node=2 scripts/train.py dataset=agnews_tf

Outputs (metrics.json, last.ckpt, best.ckpt, log.csv, tensorboard/, plots) go to the run
directory printed at the end (``output_dir``, or ``<output_dir>_2`` ... when another run
holds it); see docs/training.md. A bad setting, a damaged or mismatched checkpoint and a
missing or damaged zoo print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from neuralgraph_quasi.data import ZooFormatError, ZooNotFoundError
from neuralgraph_quasi.train import CheckpointError, ConfigError, run

log = logging.getLogger(__name__)


def _cli_keys() -> set[str]:
    """Keys set on the command line (the GPU defaults leave them alone)."""
    keys = set()
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg, cli_overrides=_cli_keys())
    except KeyboardInterrupt:
        print("interrupted: last.ckpt saved; rerun with trainer.resume=<run dir> to continue",
              file=sys.stderr)
        sys.exit(130)
    except (ConfigError, CheckpointError, ZooNotFoundError, ZooFormatError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not metrics:  # a non-zero rank of a distributed run
        return None
    shown = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
    print(json.dumps(shown, indent=1, default=str))
    print(f"run directory: {metrics.get('run_dir', cfg.output_dir)}")
    for key in ("test_kendall_tau", "test_accuracy", "test_mse"):
        if key in metrics:
            return float(metrics[key])  # for hydra sweepers
    return None


if __name__ == "__main__":
    main()
