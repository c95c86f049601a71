"""Generate a model zoo in its published layout, offline.

    python scripts/make_zoo.py dataset=agnews_tf dataset.root=DIR dataset.num_models=N
    python scripts/make_zoo.py dataset=inr dataset.num_models=256

Rerunning with the same config does nothing; an interrupted run resumes.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from neuralgraph_quasi.data.zoos import make_zoo

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_zoo")
def main(cfg: DictConfig) -> None:
    path = make_zoo(cfg.dataset)
    log.info("zoo %s ready at %s", cfg.dataset.name, path)
    print(f"zoo {cfg.dataset.name} ready at {path}")


if __name__ == "__main__":
    main()
