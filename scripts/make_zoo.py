"""Generate a model zoo in its published layout, offline.

    python scripts/make_zoo.py dataset=agnews_tf dataset.root=DIR dataset.num_models=N
    python scripts/make_zoo.py dataset=inr dataset.num_models=256

Rerunning with the same config does nothing; an interrupted run resumes. Ctrl-C stops
the training threads at their next step and prints one line (exit status 130).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from neuralgraph_quasi.data.zoos import make_zoo

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_zoo")
def main(cfg: DictConfig) -> None:
    try:
        path = make_zoo(cfg.dataset)
    except KeyboardInterrupt:
        print("make_zoo.py: interrupted; finished chunks are kept: rerun the same command to "
              "resume", file=sys.stderr)
        sys.exit(130)
    log.info("zoo %s ready at %s", cfg.dataset.name, path)
    print(f"zoo {cfg.dataset.name} ready at {path}")


if __name__ == "__main__":
    main()
