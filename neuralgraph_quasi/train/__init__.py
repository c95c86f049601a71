"""Training and evaluation of metanetworks: ``run(cfg) -> metrics`` and its parts.

``scripts/train.py`` is a thin ``@hydra.main`` around :func:`run`; ``load_run`` opens a
finished run to predict from (or edit) a user's own network.
"""

from ._build import build_model, num_trainable, runtime_shapes
from ._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._distributed import Dist, init_distributed
from ._loop import Trainer, evaluate
from ._metrics import accuracy, kendall_tau, mse, r2_score
from ._predict import ArchitectureError, RunPredictor, load_run
from ._run import apply_gpu_defaults, resolve_device, run
from ._tasks import Classify, PredictAccuracy, Task
from ._validate import ConfigError, validate_config

__all__ = ["run", "load_run", "RunPredictor", "ArchitectureError", "ConfigError",
           "validate_config", "Trainer", "evaluate", "Task", "PredictAccuracy",
           "Classify", "build_model", "runtime_shapes", "num_trainable", "CheckpointError",
           "load_checkpoint", "save_checkpoint", "Dist", "init_distributed", "kendall_tau",
           "r2_score", "mse", "accuracy", "resolve_device", "apply_gpu_defaults"]
