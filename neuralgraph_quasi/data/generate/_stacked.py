"""Training many small transformers at once: the pieces the transformer zoo generators share.

The parameters of a chunk of ``M`` runs live in one ``[M, P]`` tensor (:class:`ParamLayout`
says where each state_dict entry is); the forward is batched matmuls over the model axis
(:class:`StackedTransformer`); the four optimizers are one vectorised update rule with
per-model coefficients (:class:`StackedOptimizer`); :func:`train_stack` is the training
loop (per-run training subsets, warm-up + cosine schedule, per-model dropout) given a
forward over batch indices.

The zoo-file helpers write the published Small Transformer Zoo layout
(``<subdir>/<run>_<epoch>_<int(acc*10000)>.pt`` plus one metadata CSV) atomically and per
chunk, and :func:`run_chunks` trains the chunks (threads on CPU) under one progress bar.
Used by :mod:`.agnews` and :mod:`.mnist`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ...models import TransformerClassifier
from .._atomic import atomic_torch_save, fsync_paths

__all__ = ["OPTIMIZERS", "DTYPES", "check_dtype", "compute_precision", "DIM", "HEADS",
           "SWEEP_KEYS", "L2_GRID", "TRAIN_FRACTION_GRID", "DROPOUT_GRID", "ZooConfigBase",
           "check_sweep",
           "sample_runs", "ParamLayout", "StackedTransformer", "StackedOptimizer", "Dropout",
           "lr_schedule", "ChunkResult", "torch_seed", "runs_tensor", "init_theta", "Batches",
           "train_stack", "plan_chunks", "chunk_rows", "read_metadata",
           "save_chunk", "check_identity", "resolve_device", "run_chunks"]

OPTIMIZERS = ("adam", "rmsprop", "sgd", "sgd_momentum")
DIM, HEADS = 32, 2  # the Small Transformer Zoo architecture (TransformerClassifier's defaults)
#: Hyperparameters drawn uniformly from a grid per run (after the optimizer and its lr).
SWEEP_KEYS = ("w_init_std", "l2_regularize", "train_fraction", "dropout")
#: The grids both transformer zoos sweep (the Small Transformer Zoo's own values).
L2_GRID = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2)
TRAIN_FRACTION_GRID = (1.0, 0.9, 0.8, 0.7)
DROPOUT_GRID = (0.0, 0.05, 0.1, 0.15, 0.2)


# ----------------------------------------------------------------------------- config

class ZooConfigBase:
    """Mixin of the generator configs (dataclasses): construction from anything, identity.

    Subclasses set ``_label`` (for error messages), ``_RUNTIME_KEYS`` (keys that may
    change between runs of one zoo and are not part of its identity) and ``_ALGORITHM``
    (the version of the training code; ``None``: the original one). A version is part
    of the identity as the key ``algorithm``: a zoo begun by another version of the
    code (whose files would differ) is not resumed with this one.
    """

    _label: ClassVar[str] = "zoo"
    _RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ("root", "device", "workers", "progress")
    _ALGORITHM: ClassVar[int | None] = None
    #: Keys left out of the identity at these values (added later, with the earlier
    #: behaviour as default: a zoo written before they existed keeps its identity).
    _IMPLICIT: ClassVar[dict[str, Any]] = {"dtype": "float32"}

    @classmethod
    def from_any(cls, cfg: Any = None, **overrides):
        """A config from a dataclass, a mapping (e.g. a hydra ``DictConfig``) or keywords."""
        if isinstance(cfg, cls):
            data = asdict(cfg)
        else:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
            data = dict(cfg or {})
        data.update(overrides)
        if "algorithm" in data:  # e.g. a config read back from generator.json
            algorithm = data.pop("algorithm")
            if algorithm != cls._ALGORITHM:
                raise ValueError(f"{cls._label} zoo config has algorithm={algorithm!r}, but "
                                 f"this generator implements algorithm={cls._ALGORITHM!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls._label} zoo config keys: {unknown}")
        data = {k: _freeze(v) for k, v in data.items()}
        return cls(**data)

    def identity(self) -> dict:
        """The keys that define the zoo's contents, JSON-normalised (tuples become lists)."""
        data = {k: v for k, v in asdict(self).items() if k not in self._RUNTIME_KEYS
                and (k not in self._IMPLICIT or v != self._IMPLICIT[k])}
        if self._ALGORITHM is not None:
            data["algorithm"] = self._ALGORITHM
        return json.loads(json.dumps(data))


#: ``generator.dtype`` values: the precision of the matrix products and convolutions.
DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"generator dtype must be one of {DTYPES}, got {dtype!r}")


def compute_precision(device: torch.device, dtype: str = "float32"):
    """The context the training and evaluation forwards run in: ``"float32"`` (default)
    as is; ``"bfloat16"`` (opt-in) under ``torch.autocast`` (matrix products and
    convolutions in bfloat16, parameters, optimizer state and saved weights float32)."""
    check_dtype(dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _freeze(value):
    """Lists (from JSON/hydra) to tuples, recursively; mappings to plain dicts."""
    if isinstance(value, Mapping):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_freeze(v) for v in value)
    return value


def check_sweep(cfg) -> None:
    """The checks every sweep config shares (optimizers, lr ranges, epochs, sizes)."""
    bad = sorted(set(cfg.optimizers) - set(OPTIMIZERS))
    if bad or not cfg.optimizers:
        raise ValueError(f"optimizers must be a non-empty subset of {OPTIMIZERS}, got {bad}")
    missing = [o for o in cfg.optimizers if o not in cfg.lr_range]
    if missing:
        raise ValueError(f"lr_range has no range for optimizers {missing}")
    if not cfg.ckpt_epochs or not all(1 <= e <= cfg.epochs for e in cfg.ckpt_epochs):
        raise ValueError(f"ckpt_epochs {cfg.ckpt_epochs} must lie in 1..epochs={cfg.epochs}")
    if cfg.num_models < 1 or cfg.models_per_chunk < 1 or cfg.batch_size < 1:
        raise ValueError("num_models, models_per_chunk and batch_size must be >= 1")


def sample_runs(cfg, keys: Sequence[str] = SWEEP_KEYS) -> list[dict]:
    """The hyperparameters of every run, each drawn from its own seeded generator.

    ``cfg`` needs ``num_models``, ``seed``, ``optimizers``, ``lr_range`` and a grid per key.

    Returns:
        ``num_models`` dicts with keys ``run``, ``optimizer``, ``lr`` and ``keys`` (by
        default ``w_init_std``, ``l2_regularize``, ``train_fraction``, ``dropout``); run
        ``r`` does not depend on ``num_models``.
    """
    runs = []
    for run in range(cfg.num_models):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, run, 0x5E]))
        opt = cfg.optimizers[rng.integers(len(cfg.optimizers))]
        lo, hi = cfg.lr_range[opt]
        runs.append({
            "run": run, "optimizer": opt,
            "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            **{key: float(rng.choice(getattr(cfg, key))) for key in keys}})
    return runs


# ----------------------------------------------------------------------------- stacked model

@dataclass(frozen=True)
class ParamLayout:
    """Where each state_dict entry of a member lives in a flat ``[M, P]`` parameter tensor.

    Names, shapes and order are those of the ``state`` it was made from (for
    :meth:`for_classes`: ``TransformerClassifier(num_classes=C).state_dict()``).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> ParamLayout:
        shapes = tuple(tuple(t.shape) for t in state.values())
        sizes = [math.prod(s) for s in shapes]
        offsets = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
        return cls(tuple(state), shapes, offsets, sum(sizes))

    @classmethod
    def for_classes(cls, num_classes: int) -> ParamLayout:
        return cls.from_state(TransformerClassifier(DIM, num_classes=num_classes).state_dict())

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """``flat [M, P]`` -> ``{name: [M, *shape]}`` views sharing its storage."""
        return {n: flat[:, o: o + math.prod(s)].view(flat.shape[0], *s)
                for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)}

    def is_bias(self, device: torch.device | str = "cpu") -> Tensor:
        """``[P]`` bool, True on bias entries."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=device)
        for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True):
            mask[o: o + math.prod(s)] = n.endswith("bias")
        return mask

    def state_dict(self, row: Tensor) -> dict[str, Tensor]:
        """One member's ``state_dict`` from its row ``[P]``: contiguous float32 CPU copies."""
        return {n: row[o: o + math.prod(s)].reshape(s).to("cpu", torch.float32).clone()
                for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)}


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-model ``x @ W^T + b``: ``x [M, N, in]``, ``W [M, out, in]``, ``b [M, out]``."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


@dataclass(frozen=True)
class Dropout:
    """Inverted dropout with a rate per model, from 16-bit random integers.

    Each kept unit is scaled by ``1 / (1 - p)``. Rates are rounded to multiples of
    ``2**-16`` (the scale uses the rounded rate, so the expectation is exact).
    Sixteen random bits per unit (four per 64-bit draw) cost a third of ``torch.rand``;
    the mask is a float tensor, so the backward is one multiplication.

    Shapes: ``threshold``, ``scale`` ``[M]``; acts on ``x [M, ...]``.
    """

    threshold: Tensor  # int16: keep where bits >= threshold
    scale: Tensor
    generator: torch.Generator | None = None

    @classmethod
    def from_rates(cls, p: Tensor, generator: torch.Generator | None = None) -> Dropout:
        dropped = torch.round(p.double() * 65536)
        return cls((dropped - 32768).to(torch.int16), (65536 / (65536 - dropped)).float(),
                   generator)

    def __call__(self, x: Tensor) -> Tensor:
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        bits = bits.random_(-(2**63), 2**63 - 1, generator=self.generator)
        bits = bits.view(torch.int16)[:n].view(x.shape)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x * (bits >= self.threshold.view(shape)).to(x.dtype).mul_(self.scale.view(shape))


class StackedTransformer:
    r"""The forward of ``M`` :class:`TransformerClassifier` s at once, from embedded tokens.

    (The embedding, if any, is applied before: see e.g. :mod:`.mnist`'s patch embedding;
    ``layout`` may hold its entries too, the blocks and the classifier are read by name.)

    Per block and model: ``fc2(relu(fc1(LN(drop(attn(LN(x)))))))``, then ``drop``;
    after the blocks ``LN``, mean over tokens, ``fc2(relu(fc1(.)))``. Dropout (train
    only) acts on each block's attention output and FFN output. Without dropout each
    member's logits equal ``TransformerClassifier.forward`` up to float rounding.

    Shapes:
        params: ``{name: [M, *shape]}`` (see :class:`ParamLayout`);
        x: ``[M, B, T, d]`` (or ``[B, T, d]``, shared by all models) -> ``[M, B, C]``.
    """

    def __init__(self, layout: ParamLayout, heads: int = HEADS) -> None:
        self.layout = layout
        self.heads = heads
        self.depth = 1 + max(int(n.split(".")[1]) for n in layout.names if n.startswith("encoder"))

    def _attention(self, x: Tensor, p: dict[str, Tensor], prefix: str, batch: int) -> Tensor:
        """``x [M, B*T, d]`` -> ``[M, B*T, d]``; head ``i`` owns rows ``i*dh:(i+1)*dh``.

        Each head's projections use its own row block of the weights (a contiguous view),
        and the output projection sums the heads' contributions: no concatenation or
        permutation copies in the forward or the backward.
        """
        m, n, d = x.shape
        dh = d // self.heads
        wq, wk, wv, wo = (p[f"{prefix}.{k}.weight"]
                          for k in ("queries", "keys", "values", "out_projection"))
        out = None
        for i in range(self.heads):
            rows = slice(i * dh, (i + 1) * dh)
            q, k, v = (_linear(x, w[:, rows]).view(m * batch, n // batch, dh)
                       for w in (wq, wk, wv))
            scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(dh)  # [M*B, T, T]
            head = torch.bmm(scores.softmax(-1), v).view(m, n, dh)
            w = wo[:, :, rows].transpose(1, 2)
            out = torch.bmm(head, w) if out is None else torch.baddbmm(out, head, w)
        return out

    def __call__(self, params: dict[str, Tensor], x: Tensor,
                 dropout: Dropout | None = None) -> Tensor:
        m = next(iter(params.values())).shape[0]
        if x.dim() == 3:
            x = x.expand(m, *x.shape)
        _, b, t, d = x.shape
        x = x.reshape(m, b * t, d)
        drop = dropout or (lambda y: y)
        for i in range(self.depth):
            pre = f"encoder.{i}"
            x = F.layer_norm(x, (d,))
            x = drop(self._attention(x, params, f"{pre}.attention", b))
            x = F.layer_norm(x, (d,))
            x = _linear(x, params[f"{pre}.fc1.weight"], params[f"{pre}.fc1.bias"]).relu()
            x = _linear(x, params[f"{pre}.fc2.weight"], params[f"{pre}.fc2.bias"])
            x = drop(x)
        x = F.layer_norm(x, (d,)).view(m, b, t, d).mean(2)
        x = _linear(x, params["classifier.fc1.weight"], params["classifier.fc1.bias"]).relu()
        return _linear(x, params["classifier.fc2.weight"], params["classifier.fc2.bias"])


# ----------------------------------------------------------------------------- optimizer

class StackedOptimizer:
    r"""Adam, RMSprop, SGD and SGD with momentum as one update rule with per-model coefficients.

    For model ``m`` with gradient ``g`` (L2 included: ``g + wd_m * theta``)::

        mom = b1 * mom + c1 * g          adam: b1=.9, c1=.1; sgd_momentum: b1=.9, c1=1;
                                         sgd, rmsprop: b1=0, c1=1
        sq  = b2 * sq + (1 - b2) * g^2   adam: b2=.999; rmsprop: b2=.99
        theta -= lr * (mom / bc1) / (sqrt(sq / bc2) + eps)    adaptive (adam, rmsprop)
        theta -= lr * mom                                      sgd, sgd_momentum

    with Adam's bias corrections ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` (1 otherwise);
    this matches ``torch.optim`` (RMSprop without centring, momentum without dampening).
    A model that is inactive in a step keeps its parameters, state and step count.

    Shapes:
        lr, weight_decay: ``[M]``; theta, grad, state (``dtype``): ``[M, P]``;
        active (bool), lr_scale: ``[M]``.
    """

    _COEFFS = {  # b1, c1, b2, adaptive
        "adam": (0.9, 0.1, 0.999, 1.0), "rmsprop": (0.0, 1.0, 0.99, 1.0),
        "sgd": (0.0, 1.0, 0.0, 0.0), "sgd_momentum": (0.9, 1.0, 0.0, 0.0)}

    def __init__(self, optimizers: list[str], lr: Tensor, weight_decay: Tensor, size: int,
                 eps: float = 1e-8, dtype: torch.dtype = torch.float32) -> None:
        dev = lr.device
        coeffs = torch.tensor([self._COEFFS[o] for o in optimizers], dtype=torch.float64)
        self.b1, self.c1, self.b2, self.adaptive = (c.to(dev) for c in coeffs.unbind(1))
        self.bias_corrected = torch.tensor([o == "adam" for o in optimizers], device=dev)
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.step_count = torch.zeros(len(optimizers), dtype=torch.int64, device=dev)
        self.mom = torch.zeros(len(optimizers), size, device=dev, dtype=dtype)
        self.sq = torch.zeros(len(optimizers), size, device=dev, dtype=dtype)

    @torch.no_grad()
    def step(self, theta: Tensor, grad: Tensor, lr_scale: Tensor, active: Tensor) -> None:
        on = active.double()
        col = lambda v: v.to(theta.dtype).unsqueeze(1)  # noqa: E731  [M] -> [M, 1]
        self.step_count += active.long()
        t = self.step_count.double().clamp(min=1)
        bc1 = torch.where(self.bias_corrected, 1 - self.b1 ** t, torch.ones_like(t))
        bc2 = torch.where(self.bias_corrected, 1 - self.b2 ** t, torch.ones_like(t))
        g = grad + col(self.weight_decay) * theta
        # an inactive model's state decays by 1 and takes in 0: it stays as it is
        self.mom.mul_(col(1 - on * (1 - self.b1))).add_(g * col(on * self.c1))
        self.sq.mul_(col(1 - on * (1 - self.b2))).add_(g * g * col(on * (1 - self.b2)))
        denom = torch.sqrt(self.sq / col(bc2)).add_(self.eps) * col(self.adaptive)
        denom.add_(col(1 - self.adaptive))
        theta.sub_(self.mom / denom * col(on * self.lr * lr_scale / bc1))


def lr_schedule(step: Tensor, total: Tensor, warmup_fraction: float) -> Tensor:
    """Linear warm-up over ``ceil(warmup_fraction * total)`` steps, then cosine to 0.

    Shapes: ``step``, ``total`` ``[M]`` int (``step`` 0-based) -> ``[M]`` float64.
    """
    step, total = step.double(), total.double()
    warm = torch.ceil(warmup_fraction * total).clamp(min=1)
    cosine = 0.5 * (1 + torch.cos(math.pi * (step - warm).clamp(min=0)
                                  / (total - warm).clamp(min=1)))
    return torch.where(step < warm, (step + 1) / warm, cosine)




# ----------------------------------------------------------------------------- training

@dataclass
class ChunkResult:
    """What training one chunk produced, per checkpoint epoch.

    ``weights[e]``: ``[M, P]`` CPU float32; ``correct[e]``: ``[M]`` test-set correct counts;
    ``test_loss[e]``, ``train_loss[e]``: ``[M]`` (train: mean batch loss over epoch ``e``).
    """

    weights: dict[int, Tensor]
    correct: dict[int, Tensor]
    test_loss: dict[int, Tensor]
    train_loss: dict[int, Tensor]


def torch_seed(*key: int) -> int:
    """A torch seed from an integer key (via numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def runs_tensor(runs: list[dict], key: str, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """``[M]``: one hyperparameter of every run."""
    return torch.tensor([r[key] for r in runs], dtype=dtype, device=device)


def init_theta(runs: list[dict], layout: ParamLayout, gen: torch.Generator,
               device: torch.device) -> Tensor:
    """``[M, P]``: weights trunc-normal (+-2 std) with each run's ``w_init_std``, biases 0."""
    theta = torch.empty(len(runs), layout.size, device=device)
    torch.nn.init.trunc_normal_(theta, std=1.0, a=-2.0, b=2.0, generator=gen)
    theta.mul_(runs_tensor(runs, "w_init_std", device).unsqueeze(1))
    return theta.masked_fill_(layout.is_bias(device), 0.0)


class Batches:
    """Each run's random training subset and, per epoch, its shuffled batches.

    Run ``m`` owns ``n_m = round(train_fraction_m * N)`` examples and takes
    ``steps_m = ceil(n_m / B)`` steps per epoch; its last batch wraps around to the
    start of its permutation. Shapes: ``epoch_order() [M, N]``, ``batch(...) [M, B]``.
    """

    def __init__(self, runs: list[dict], n_docs: int, batch_size: int, gen: torch.Generator,
                 device: torch.device) -> None:
        self.gen, self.n_docs, self.m = gen, n_docs, len(runs)
        frac = runs_tensor(runs, "train_fraction", device, torch.float64)
        self.n_own = (frac * n_docs).round().long().clamp(1, n_docs)
        rank = torch.rand(self.m, n_docs, generator=gen, device=device).argsort(1).argsort(1)
        self.member = rank < self.n_own.unsqueeze(1)
        self.steps = (self.n_own + batch_size - 1) // batch_size
        self.offsets = torch.arange(batch_size, device=device)

    def epoch_order(self) -> Tensor:
        """A fresh permutation per run with its own examples first."""
        keys = torch.rand(self.m, self.n_docs, generator=self.gen, device=self.member.device)
        return keys.masked_fill_(~self.member, 2.0).argsort(1)

    def batch(self, order: Tensor, step: int) -> Tensor:
        pos = (step * self.offsets.numel() + self.offsets) % self.n_own.unsqueeze(1)
        return order.gather(1, pos)


#: ``forward(params, idx [M, B], dropout) -> logits [M, B, C]`` on training examples ``idx``.
Forward = Callable[[dict[str, Tensor], Tensor, "Dropout | None"], Tensor]
#: ``evaluate(params) -> (correct [M] int64, mean test loss [M])``.
Evaluate = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]


def train_stack(runs: list[dict], layout: ParamLayout, forward: Forward, evaluate: Evaluate,
                train_labels: Tensor, cfg, gen: torch.Generator, device: torch.device,
                on_step: Callable[[float], None] | None = None) -> ChunkResult:
    """Train the runs of one chunk together; evaluate and snapshot at ``cfg.ckpt_epochs``.

    ``cfg`` gives ``epochs``, ``ckpt_epochs``, ``batch_size`` and ``warmup_fraction``.
    Randomness (init, training subsets, batch order, dropout) comes from ``gen``, in that
    order. Runs with fewer steps than others in an epoch sit out the remaining steps
    (see :class:`Batches`). ``on_step(models)`` is called after every step with the
    progress made, in models; it may raise to abort.
    """
    m = len(runs)
    theta = init_theta(runs, layout, gen, device)
    params = {k: v.requires_grad_() for k, v in layout.views(theta).items()}
    opt = StackedOptimizer([r["optimizer"] for r in runs],
                           runs_tensor(runs, "lr", device, torch.float64),
                           runs_tensor(runs, "l2_regularize", device), layout.size)
    dropout = None
    if any(r["dropout"] > 0 for r in runs):
        dropout = Dropout.from_rates(runs_tensor(runs, "dropout", device), gen)
    train_y = train_labels.to(device)
    precision = compute_precision(device, getattr(cfg, "dtype", "float32"))
    batches = Batches(runs, train_y.shape[0], cfg.batch_size, gen, device)
    total, max_steps = batches.steps * cfg.epochs, int(batches.steps.max())

    result = ChunkResult({}, {}, {}, {})
    for epoch in range(1, cfg.epochs + 1):
        order = batches.epoch_order()
        loss_sum = torch.zeros(m, device=device)
        for step in range(max_steps):
            active = step < batches.steps
            idx = batches.batch(order, step)  # [M, B]
            with precision:
                logits = forward(params, idx, dropout)
            losses = F.cross_entropy(logits.float().transpose(1, 2), train_y[idx],
                                     reduction="none")
            losses = losses.mean(1)  # [M]
            grads = torch.autograd.grad(losses.sum(), list(params.values()))
            opt.step(theta, torch.cat([g.reshape(m, -1) for g in grads], 1),
                     lr_schedule(opt.step_count, total, cfg.warmup_fraction), active)
            loss_sum += losses.detach() * active
            if on_step is not None:
                on_step(m / (cfg.epochs * max_steps))
        if epoch in cfg.ckpt_epochs:
            with torch.no_grad(), precision:
                correct, test_loss = evaluate(params)
            result.weights[epoch] = theta.detach().to("cpu", copy=True)
            result.correct[epoch] = correct.cpu()
            result.test_loss[epoch] = test_loss.cpu()
            result.train_loss[epoch] = (loss_sum / batches.steps).cpu()
    return result


@torch.no_grad()
def evaluate_logits(logits_of: Callable[[int, int], Tensor], labels: Tensor,
                    batch_size: int) -> tuple[Tensor, Tensor]:
    """Correct counts ``[M]`` int64 and mean cross-entropy ``[M]`` over ``labels [N]``.

    ``logits_of(start, stop)`` gives ``[M, stop - start, C]`` for examples ``start:stop``.
    """
    correct, loss = 0, 0.0
    for start in range(0, labels.shape[0], batch_size):
        y = labels[start: start + batch_size]
        logits = logits_of(start, start + batch_size).float()  # [M, B, C]
        correct = correct + (logits.argmax(-1) == y).sum(1)
        loss = loss + F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1),
                                      reduction="none").sum(1)
    return correct, loss / labels.shape[0]


def plan_chunks(runs: list[dict], size: int) -> list[list[dict]]:
    """Split the runs into chunks of ``size`` trained together.

    Runs are ordered by train fraction (largest first), then by run index, so that a
    chunk's runs take the same number of steps per epoch: a run with fewer steps than
    its chunk would compute in the others' extra steps for nothing.
    """
    ordered = sorted(runs, key=lambda r: (-r["train_fraction"], r["run"]))
    return [ordered[i: i + size] for i in range(0, len(ordered), size)]


# ----------------------------------------------------------------------------- zoo files

_CKPT_NAME = re.compile(r"(\d+)_(\d+)_(\d+)\.pt")  # run, epoch, int(acc*10000)


def ckpt_name(subdir: str, run: int, epoch: int, correct: int, total: int) -> str:
    """``<subdir>/<run>_<epoch>_<int(acc*10000)>.pt``, the accuracy field floored exactly."""
    return f"{subdir}/{run}_{epoch}_{correct * 10000 // total}.pt"


def read_metadata(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def chunk_rows(runs: list[dict], result: ChunkResult, fixed: Mapping[str, Any], subdir: str,
               n_test: int, accuracy_key: str) -> list[dict]:
    """Metadata rows of a trained chunk (run-major, epochs ascending).

    Each row: the run's hyperparameters, ``fixed`` (config columns shared by all runs),
    ``ckpt_epoch`` (a string), ``ckpt_file``, ``accuracy_key``, ``test_loss``,
    ``train_loss``.
    """
    rows = []
    for i, run in enumerate(runs):
        for epoch in sorted(result.weights):
            correct = int(result.correct[epoch][i])
            rows.append({
                **run, **fixed, "ckpt_epoch": str(epoch),
                "ckpt_file": ckpt_name(subdir, run["run"], epoch, correct, n_test),
                accuracy_key: correct / n_test,
                "test_loss": float(result.test_loss[epoch][i]),
                "train_loss": float(result.train_loss[epoch][i])})
    return rows


def _write_checkpoints(root: Path, subdir: str, chunk: list[dict], rows: list[dict],
                       result: ChunkResult, to_state: Callable[[Tensor], dict]) -> None:
    """Write a chunk's checkpoint files, removing stale files of its runs first."""
    position = {run["run"]: i for i, run in enumerate(chunk)}
    keep = {r["ckpt_file"] for r in rows}
    for stale in (root / subdir).glob("*.pt"):
        match = _CKPT_NAME.fullmatch(stale.name)
        if match and int(match[1]) in position and f"{subdir}/{stale.name}" not in keep:
            stale.unlink()
    for row in rows:
        weights = result.weights[int(row["ckpt_epoch"])][position[row["run"]]]
        atomic_torch_save(to_state(weights), root / row["ckpt_file"], fsync=False)
    fsync_paths([root / row["ckpt_file"] for row in rows])  # one batch: durable before the CSV


def save_chunk(root: Path, subdir: str, rows: list[dict], chunk: list[dict],
               new_rows: list[dict], result: ChunkResult, to_state: Callable[[Tensor], dict],
               write: Callable[[list[dict]], None]) -> list[dict]:
    """Write a chunk's checkpoints, then (``write``) the metadata with its rows; return all."""
    _write_checkpoints(root, subdir, chunk, new_rows, result, to_state)
    runs = {r["run"] for r in chunk}
    rows = [r for r in rows if int(r["run"]) not in runs] + new_rows
    rows.sort(key=lambda r: (int(r["run"]), int(r["ckpt_epoch"])))
    write(rows)
    return rows


def check_identity(root: Path, spec: Path, identity: dict) -> None:
    """Raise ``ValueError`` naming the differing keys if ``spec`` holds another config."""
    stored = json.loads(spec.read_text())["config"]
    diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
    if diff:
        detail = "; ".join(f"{k}: zoo has {stored.get(k)!r}, config has {identity.get(k)!r}"
                           for k in diff)
        raise ValueError(f"{root} holds a zoo generated with a different config "
                         f"(differing keys: {', '.join(diff)}). {detail}. Use another root "
                         "or the zoo's own config.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (``None``: leave it)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class _Stopped(Exception):
    """Raised inside a worker to abort its chunk."""


def run_chunks(chunks: list[list[dict]], todo: list[int],
               train: Callable[[int, Callable[[float], None]], ChunkResult],
               save: Callable[[int, ChunkResult], None], *, num_models: int,
               device: torch.device, workers: int | None, progress: bool, desc: str) -> None:
    """Train chunks ``todo`` (``train(c, on_step)``) and ``save`` each as it finishes.

    On CPU ``workers`` chunks train at a time in threads, each with one intra-op thread
    (``None``: ``torch.get_num_threads()``); on an accelerator one at a time. Saving runs
    in the calling thread, so ``save`` needs no lock. An exception (or an interrupt)
    stops the other workers at their next step and is re-raised.
    """
    cpu = device.type == "cpu"
    workers = min(len(todo), (workers or torch.get_num_threads()) if cpu else 1)
    done = num_models - sum(len(chunks[c]) for c in todo)
    stop, lock, made = threading.Event(), threading.Lock(), [0.0] * len(chunks)
    with (tqdm(total=num_models, initial=done, unit="model", desc=desc, disable=not progress,
               smoothing=0.05, bar_format=_BAR) as bar,
          _intra_op_threads(1 if cpu else None),
          ThreadPoolExecutor(workers, thread_name_prefix="zoo-chunk") as pool):

        def advance(c: int, models: float) -> None:
            if stop.is_set():
                raise _Stopped
            with lock:  # float steps may sum past a chunk's size: the bar never overshoots
                step = min(made[c] + models, len(chunks[c])) - made[c]
                made[c] += step
                bar.n = min(bar.n, num_models - step)  # rounding: n + step <= total
                bar.update(step)

        futures = {pool.submit(train, c, partial(advance, c)): c for c in todo}
        try:
            for future in as_completed(futures):
                c = futures[future]
                save(c, future.result())
                with lock:  # saved chunks count exactly (no float drift in the bar)
                    made[c] = len(chunks[c])
                    bar.n = done + sum(made)
                    bar.refresh()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
