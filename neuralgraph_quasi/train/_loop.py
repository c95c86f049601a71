"""The training loop: PyG batches on the device, checkpoints, resume, Ctrl-C, progress.

:class:`Trainer` fits one model on one split and keeps its run directory::

    last.ckpt   best.ckpt   log.csv   tensorboard/

The step is a forward on a whole :class:`~torch_geometric.data.Batch`, the task's
loss, a backward, optional gradient clipping and an optimizer and scheduler step: no
Python work per graph. Validation runs on the main process after every epoch; the
best checkpoint is the one with the highest validation score (Kendall τ, accuracy, or
minus the editing MSE).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ._batches import ZooLoader
from ._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ._distributed import Dist, ResumableSampler
from ._logging import RunLogger
from ._tasks import Task

__all__ = ["Trainer", "cosine_schedule", "evaluate", "resolve_amp", "resolve_compile",
           "native_bfloat16", "COMPILE_MIN_STEPS"]

log = logging.getLogger(__name__)


def cosine_schedule(total_steps: int, warmup_fraction: float = 0.0,
                    kind: str = "cosine") -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine to 0 (or constant)."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


#: ``trainer.compile=auto`` compiles only runs of at least this many training steps: on the
#: 2-core CPU compiling the layers takes about a minute (again for each new batch shape,
#: training and evaluation apart), and a compiled step saves a third of an eager one.
COMPILE_MIN_STEPS = 2000
_SWITCH = {"auto": None, "true": True, "false": False}


def _switch(trainer: Any, key: str, default: str) -> bool | None:
    """``trainer.<key>`` as True, False or None (``auto``); YAML booleans or strings."""
    value = trainer.get(key, default)
    if isinstance(value, bool):
        return value
    choice = _SWITCH.get(str(value).lower())
    if str(value).lower() not in _SWITCH:
        raise ValueError(f"trainer.{key} must be auto, true or false, got {value!r}")
    return choice


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU that supports
    bfloat16 (Ampere and later), or a CPU with AVX512-BF16 or AMX-BF16 (``/proc/cpuinfo``)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(trainer: Any, device: torch.device) -> tuple[bool, str]:
    """``trainer.amp`` (``auto|true|false``) as a decision and its reason. ``auto``: bfloat16
    autocast where the device has native bfloat16 matrix units (:func:`native_bfloat16`)."""
    choice = _switch(trainer, "amp", "false")
    if choice is not None:
        return choice, f"trainer.amp={str(choice).lower()}"
    native = native_bfloat16(device)
    return native, (f"trainer.amp=auto: {device.type} "
                    f"{'has' if native else 'has no'} native bfloat16 matrix units")


def resolve_compile(trainer: Any, model: nn.Module, device: torch.device,
                    total_steps: int) -> tuple[bool, str]:
    """``trainer.compile`` (``auto|true|false``) as a decision and its reason. A model without
    message-passing layers (:func:`~neuralgraph_quasi.nn.compile_layers`; e.g. the STATNN
    baseline) always runs eager. ``auto``: compile when ``torch.compile`` can run on the
    device (a C++ compiler on the CPU, Triton on CUDA) and the run has at least
    :data:`COMPILE_MIN_STEPS` training steps to pay back the compile time."""
    from ..nn._compile import _layers, compile_supported

    choice = _switch(trainer, "compile", "auto")
    if choice is not False and _layers(model) is None:  # e.g. the STATNN baseline
        return False, (f"trainer.compile={'auto' if choice is None else 'true'}: "
                       f"{type(model).__name__} has no layers to compile")
    if choice is not None:
        return choice, f"trainer.compile={str(choice).lower()}"
    if device.type == "cuda":
        import importlib.util

        supported = importlib.util.find_spec("triton") is not None
    else:
        supported = device.type == "cpu" and compile_supported()
    if not supported:
        return False, f"trainer.compile=auto: torch.compile cannot run on {device.type} here"
    if total_steps < COMPILE_MIN_STEPS:
        return False, (f"trainer.compile=auto: {total_steps} steps < {COMPILE_MIN_STEPS}, "
                       "too short to pay back the compile time")
    return True, f"trainer.compile=auto: {total_steps} steps >= {COMPILE_MIN_STEPS}"


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, dataset, device: torch.device, batch_size: int = 64,
             amp: bool = False) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics, predictions and targets of ``model`` on a whole dataset (in its order)."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    for batch in ZooLoader(dataset, batch_size, device=device):
        with _autocast(device, amp):
            out = model(batch)
        # kept on the device: one copy to the host at the end, not a wait per batch
        preds.append(task.predict(out, batch).detach().float())
        targets.append(task.target(batch).detach())
    model.train(was_training)
    if not preds:
        return {}, torch.zeros(0), torch.zeros(0)
    pred, target = torch.cat(preds).cpu(), torch.cat(targets).cpu()
    return task.metrics(pred, target), pred, target


class Trainer:
    """Fit ``model`` to ``train_set``, validate on ``val_set``, checkpoint into ``directory``.

    Args:
        model: a module taking a batch of graphs.
        task: the :class:`~neuralgraph_quasi.train.Task` (loss, predictions, metrics).
        train_set / val_set: datasets of graphs.
        directory: the run directory (checkpoints and logs).
        optimizer: a callable ``params -> torch.optim.Optimizer`` (hydra ``_partial_``).
        trainer: the ``trainer`` config section (epochs, batch size, ...).
        device: where batches and the model go.
        dist: the process group (:func:`~neuralgraph_quasi.train.init_distributed`).
        config: the run's config, stored in every checkpoint.
        seed: shuffling seed.
        name: shown on the progress bar.
        extra: more entries for every checkpoint (e.g. the model's runtime shapes).
    """

    def __init__(self, model: nn.Module, task: Task, train_set, val_set, directory: str | Path,
                 optimizer: Callable, trainer: Any, device: torch.device, dist: Dist,
                 config: dict, seed: int = 0, name: str = "train",
                 extra: dict | None = None) -> None:
        self.module = model.to(device)
        self.task, self.train_set, self.val_set = task, train_set, val_set
        self.directory = Path(directory)
        self.cfg, self.device, self.dist, self.config = trainer, device, dist, config
        self.name, self.seed = name, seed
        self.extra = dict(extra or {})
        self.amp, amp_reason = resolve_amp(trainer, device)
        self.batch_size = int(trainer.batch_size)
        self.sampler = ResumableSampler(train_set, dist, seed)
        per_rank = math.ceil(len(train_set) / dist.world_size)
        self.drop_last = per_rank > self.batch_size  # no batch of one graph (batch norms)
        self.steps_per_epoch = (per_rank // self.batch_size if self.drop_last
                                else math.ceil(per_rank / self.batch_size))
        self.epochs = int(trainer.epochs)
        max_steps = trainer.get("max_steps")
        self.total_steps = self.epochs * self.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, int(max_steps))
        self.compile, compile_reason = resolve_compile(trainer, self.module, device,
                                                       self.total_steps)
        if self.compile:  # in place: parameter names and checkpoints are unchanged
            from ..nn._compile import compile_layers

            compile_layers(self.module)
        log.info("%s: %s %s; %s %s (compilation, at the first steps, counts in the "
                 "training time)", name, "bfloat16 autocast" if self.amp else "float32",
                 f"({amp_reason})", "layers compiled" if self.compile else "eager",
                 f"({compile_reason})")
        self.optimizer = optimizer(params=[p for p in self.module.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(self.total_steps, float(trainer.warmup_fraction),
                                            str(trainer.scheduler)))
        self.model = self.module
        if dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.module, device_ids=ids,
                find_unused_parameters=bool(trainer.get("find_unused_parameters", True)))
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.train_time = 0.0
        self.train_graphs = 0
        self.history: list[dict] = []

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "train_time": self.train_time, "train_graphs": self.train_graphs,
                "history": self.history, "config": self.config, **self.extra}

    def save(self, name: str) -> Path:
        path = self.directory / name
        if self.dist.main:
            save_checkpoint(path, self.state())
        return path

    def resume(self, path: str | Path) -> None:
        """Restore everything from checkpoint ``path`` (model, optimizer, scheduler, RNG,
        step, epoch, position within the epoch, best score, history).

        Read on the CPU: ``load_state_dict`` moves the model's and the optimizer's tensors
        to their parameters' device, but leaves Adam's ``step`` counters where the file
        put them; on the GPU, every step would then read them back (``.item()``), a wait
        per parameter and step."""
        state = load_checkpoint(path, map_location="cpu")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.best_score = float(state.get("best_score", -math.inf))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.train_time = float(state.get("train_time", 0.0))
        self.train_graphs = int(state.get("train_graphs", 0))
        self.history = list(state.get("history", []))
        log.info("%s: resumed from %s at step %d (epoch %d, batch %d)", self.name, path,
                 self.step, self.epoch, self.batch_in_epoch)

    def load_best(self) -> None:
        best = self.directory / "best.ckpt"
        if best.exists():
            self.module.load_state_dict(load_checkpoint(best, "cpu")["model"])

    # -- training ---------------------------------------------------------------------
    def _loader(self) -> ZooLoader:
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.batch_in_epoch * self.batch_size
        return ZooLoader(self.train_set, self.batch_size, self.sampler, self.drop_last,
                         self.device)

    def fit(self, progress: bool = True) -> dict[str, float]:
        """Train until ``trainer.epochs`` (or ``max_steps``); Ctrl-C saves ``last.ckpt``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        logger = RunLogger(self.directory, bool(self.cfg.get("tensorboard", True))
                           and self.dist.main, self.history) if self.dist.main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                   disable=not (progress and self.dist.main), dynamic_ncols=True)
        clip = self.cfg.get("grad_clip")
        try:
            while self.epoch < self.epochs and self.step < self.total_steps:
                self.model.train()
                loss_sum = torch.zeros((), device=self.device)
                batches, graphs, started = 0, 0, time.perf_counter()
                for batch in self._loader():
                    with _autocast(self.device, self.amp):
                        out = self.model(batch)
                    loss = self.task.loss(out, batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip:
                        nn.utils.clip_grad_norm_(self.module.parameters(), float(clip))
                    self.optimizer.step()
                    self.scheduler.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    batches += 1
                    graphs += batch.num_graphs
                    loss_sum += loss.detach()
                    bar.update(1)
                    if batches % int(self.cfg.get("log_every", 10)) == 0:
                        rate = graphs * self.dist.world_size / (time.perf_counter() - started)
                        bar.set_postfix(loss=f"{float(loss_sum) / batches:.4f}",
                                        val=self._last_score(), graphs_s=f"{rate:.0f}")
                    if self.step >= self.total_steps:
                        break
                elapsed = time.perf_counter() - started
                self.train_time += elapsed
                self.train_graphs += graphs * self.dist.world_size
                if self.dist.enabled:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= self.dist.world_size
                self.epoch += 1
                self.batch_in_epoch = 0
                row = {"step": self.step, "epoch": self.epoch,
                       "train_loss": float(loss_sum) / max(batches, 1),
                       "lr": self.scheduler.get_last_lr()[0],
                       "graphs_per_s": graphs * self.dist.world_size / max(elapsed, 1e-9)}
                if self.dist.main:
                    metrics, _, _ = evaluate(self.module, self.task, self.val_set, self.device,
                                             int(self.cfg.get("eval_batch_size",
                                                              self.batch_size)), self.amp)
                    row.update({f"val_{k}": v for k, v in metrics.items()})
                    score = self.task.score(metrics)
                    improved = score > self.best_score or self.best_epoch < 0
                    if improved:
                        self.best_score, self.best_epoch = score, self.epoch
                    self.history.append(row)
                    logger.log(row)
                    self.save("last.ckpt")
                    if improved:
                        self.save("best.ckpt")
                    bar.set_postfix(loss=f"{row['train_loss']:.4f}", val=self._last_score(),
                                    graphs_s=f"{row['graphs_per_s']:.0f}")
                self.dist.barrier()
        except KeyboardInterrupt:
            path = self.save("last.ckpt")
            bar.close()
            log.warning("%s: interrupted at step %d; saved %s (resume with "
                        "trainer.resume=%s)", self.name, self.step, path, self.directory)
            raise
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        return self.history[-1] if self.history else {}

    def _last_score(self) -> str:
        if not self.history:
            return "-"
        key = f"val_{self.task.score_name}"
        return f"{self.history[-1].get(key, float('nan')):.3f}"

    @property
    def graphs_per_s(self) -> float:
        return self.train_graphs / self.train_time if self.train_time > 0 else 0.0
