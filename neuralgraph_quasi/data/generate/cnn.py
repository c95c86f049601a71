"""Generate a Small CNN Zoo in the published layout, trained on scikit-learn's digits.

:func:`generate` trains ``num_models`` runs of
:func:`~neuralgraph_quasi.data.cnn_zoo.small_cnn` (3 × 3×3 stride-2 conv with 16
channels, global mean pool, linear 16→10) on the 8×8 digits upsampled to 28×28
(:func:`~neuralgraph_quasi.data.images.load_digits`), with hyperparameters drawn per
run as in Unterthiner et al. (2020): activation, initialisation and its std,
optimizer, learning rate, L2, dropout, train fraction. Many runs train at once: a
chunk of ``M`` runs is one set of stacked parameters, each conv a grouped convolution
over the model axis (``groups=M``, every run on its own batch), the optimizers one
vectorised update (:class:`~neuralgraph_quasi.data.generate._stacked.StackedOptimizer`).

Files written under ``root`` (the published format, read by
:class:`~neuralgraph_quasi.data.SmallCNNZoo`)::

    weights.npy        [num_models * len(steps), 4970] float32, TensorFlow layouts
                       (conv kernels HWIO, dense kernel (in, out)); row
                       ``run * len(steps) + j`` is run ``run`` after epoch ``steps[j]``
    metrics.csv        one row per weights row: config.* columns, modeldir, step (the
                       epoch), test_accuracy/test_loss (digits test split),
                       train_accuracy/train_loss (the run's own training subset)
    layout.csv         varname, start_idx, end_idx, shape (bias before kernel, as TF)
    generator.json     the generator config (the zoo's identity)
    shards/chunk_*.npz per-chunk results while generating (removed once assembled)

Members take images ``[B, 1, image_size, image_size]`` in ``[0, 1]`` (28 by default).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._atomic import atomic_open, atomic_write_csv, atomic_write_json
from ..cnn_zoo import METRICS_COLUMNS, CNNLayout, small_cnn, standard_layout, torch_to_tf
from ..images import load_digits
from ._stacked import (
    OPTIMIZERS,
    ParamLayout,
    StackedOptimizer,
    ZooConfigBase,
    check_dtype,
    check_identity,
    compute_precision,
    resolve_device,
    run_chunks,
    torch_seed,
)

__all__ = ["CNNZooConfig", "generate", "sample_runs", "StackedCNN", "train_chunk",
           "evaluate_stack", "chunk_plan"]

ACTIVATIONS = ("relu", "tanh")
W_INITS = ("RandomNormal", "TruncatedNormal")
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- config

@dataclass
class CNNZooConfig(ZooConfigBase):
    """Everything that defines a generated CNN zoo. Defaults: a CPU zoo of 256 runs.

    Data: ``image_size`` (side of the upsampled digits; 28 as MNIST).

    Training: ``steps`` are the epochs after which a row is recorded (0 = the
    initialisation); a run trains ``max(steps)`` epochs, each a pass over its own
    random ``train_fraction`` of the training digits in batches of ``batch_size``
    (constant learning rate, as the original zoo).

    Sweep (per run, seeded by ``(seed, run)``, so run ``r`` does not depend on
    ``num_models``): ``activations``, ``optimizers`` and ``w_init`` (uniform choice);
    ``lr_range[optimizer]``, ``init_std`` and ``l2reg`` (log-uniform in ``(lo, hi)``);
    ``dropout`` (uniform in ``(lo, hi)``, after every conv activation);
    ``train_fraction`` (uniform choice). Kernels start ``N(0, init_std²)``
    (``TruncatedNormal``: cut at ±2 std), biases at zero (``b_init = zeros``); the
    L2 penalty ``l2reg * Σ kernel²`` (Keras' ``kernel_regularizer``) joins the loss.

    Precision: ``dtype`` ``"float32"`` (default) or ``"bfloat16"`` (opt-in: the
    convolutions and matrix products under ``torch.autocast``, parameters, optimizer
    and saved weights float32; faster on CPUs with bfloat16 instructions, and the zoo
    then depends on the CPU's kernels). Part of the zoo's identity.

    Execution: ``models_per_chunk`` runs trained at once (see :func:`chunk_plan`);
    ``eval_batch_size`` images per evaluation forward; ``device`` (``"auto"``:
    CUDA when available); ``threads`` (torch CPU threads, ``None``: leave as is);
    ``progress`` (tqdm bar); ``keep_shards`` (keep ``shards/`` after assembly).
    ``workers`` (CPU only: chunks trained concurrently in threads, each with one
    intra-op thread; ``None``: the thread count; the files do not depend on it).
    ``root``, ``device``, ``threads``, ``workers``, ``progress`` and ``keep_shards`` may
    change between runs of one zoo; any other key must match ``root/generator.json``.
    """

    root: str = "data/cnn_zoo"
    num_models: int = 256
    seed: int = 0
    image_size: int = 28
    # training
    steps: tuple[int, ...] = (0, 1, 2, 4, 8, 12)
    batch_size: int = 16
    # sweep
    activations: tuple[str, ...] = ACTIVATIONS
    optimizers: tuple[str, ...] = ("adam", "rmsprop", "sgd")
    lr_range: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "adam": (1e-3, 3e-2), "rmsprop": (3e-4, 1e-2), "sgd": (3e-2, 0.5),
        "sgd_momentum": (3e-3, 0.1)})
    w_init: tuple[str, ...] = W_INITS
    init_std: tuple[float, float] = (0.05, 0.6)
    l2reg: tuple[float, float] = (1e-8, 1e-2)
    dropout: tuple[float, float] = (0.0, 0.3)
    train_fraction: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    # execution
    models_per_chunk: int = 128
    eval_batch_size: int = 128
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    workers: int | None = None
    progress: bool = True
    keep_shards: bool = False
    _label = "CNN"  # class attributes (no annotation): not config keys
    _RUNTIME_KEYS = ("root", "device", "progress", "threads", "workers", "keep_shards")
    #: 2: first convolution on patches, 16-bit dropout masks, tanh as 2 sigmoid(2x) - 1,
    #: single-threaded chunks
    _ALGORITHM = 2

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        _check_subset("activations", self.activations, ACTIVATIONS)
        _check_subset("optimizers", self.optimizers, OPTIMIZERS)
        _check_subset("w_init", self.w_init, W_INITS)
        missing = [o for o in self.optimizers if o not in self.lr_range]
        if missing:
            raise ValueError(f"lr_range has no range for optimizers {missing}")
        if not self.steps or self.steps[0] < 0 or list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must be increasing epochs >= 0, got {self.steps}")
        if self.image_size < 15:
            raise ValueError(f"image_size must be >= 15 (three 3×3 stride-2 convolutions), "
                             f"got {self.image_size}")
        if min(self.num_models, self.models_per_chunk, self.batch_size,
               self.eval_batch_size) < 1:
            raise ValueError("num_models, models_per_chunk, batch_size and eval_batch_size "
                             "must be >= 1")
        if not all(0 < f <= 1 for f in self.train_fraction) or not self.train_fraction:
            raise ValueError(f"train_fraction values must lie in (0, 1], got "
                             f"{self.train_fraction}")
        if not 0 <= self.dropout[0] <= self.dropout[1] < 1:
            raise ValueError(f"dropout must be a range within [0, 1), got {self.dropout}")

    @property
    def epochs(self) -> int:
        return max(self.steps)


def _check_subset(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    bad = sorted(set(values) - set(allowed))
    if bad or not values:
        raise ValueError(f"{name} must be a non-empty subset of {tuple(allowed)}, got {values}")


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sample_runs(cfg: CNNZooConfig) -> list[dict]:
    """The hyperparameters of every run, each drawn from its own seeded generator.

    Returns:
        ``num_models`` dicts keyed like the ``config.*`` columns (without the prefix)
        plus ``run``.
    """
    runs = []
    for run in range(cfg.num_models):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, run, 0xC7]))
        optimizer = str(rng.choice(cfg.optimizers))
        runs.append({
            "run": run, "activation": str(rng.choice(cfg.activations)), "optimizer": optimizer,
            "learning_rate": _log_uniform(rng, *cfg.lr_range[optimizer]),
            "w_init": str(rng.choice(cfg.w_init)), "init_std": _log_uniform(rng, *cfg.init_std),
            "l2reg": _log_uniform(rng, *cfg.l2reg),
            "dropout": float(rng.uniform(*cfg.dropout)),
            "train_fraction": float(rng.choice(cfg.train_fraction))})
    return runs


def chunk_plan(runs: list[dict], size: int) -> list[list[dict]]:
    """Runs grouped into chunks of at most ``size`` runs of one activation (so a chunk
    computes one nonlinearity), each sorted by (train fraction, run)."""
    chunks = []
    for activation in sorted({r["activation"] for r in runs}):
        group = sorted((r for r in runs if r["activation"] == activation),
                       key=lambda r: (r["train_fraction"], r["run"]))
        chunks += [group[i: i + size] for i in range(0, len(group), size)]
    return chunks


# ----------------------------------------------------------------------------- stacked model

def patches(images: Tensor) -> Tensor:
    """The 3×3 stride-2 patches of ``images [N, C, H, W]``: ``[N, C*9, L]`` (``L`` output
    positions, row-major), the first convolution's input as a matrix product."""
    return F.unfold(images, 3, stride=2)


def _tanh(h: Tensor) -> Tensor:
    """``tanh(h)`` as ``2 sigmoid(2h) - 1``: within 2e-7 of ``torch.tanh`` in float32 and
    several times faster on CPU (whose ``tanh`` kernel is slow)."""
    s = torch.sigmoid(h * 2)
    if torch.is_grad_enabled() and h.requires_grad:  # autograd saves the sigmoid's output
        return s * 2 - 1
    return s.mul_(2).sub_(1)


class _ActDrop(torch.autograd.Function):
    """``act(h) * keep`` (``keep``: dropout's mask times its scale, or None) with a
    one-multiplication backward: the forward saves the combined gate."""

    @staticmethod
    def forward(ctx, h: Tensor, keep: Tensor | None, relu: bool) -> Tensor:  # noqa: D102
        if relu:
            gate = (h > 0).to(h.dtype)
            if keep is not None:
                gate.mul_(keep)
            ctx.save_for_backward(gate)
            ctx.relu = True
            return h * gate
        y = _tanh(h)
        ctx.save_for_backward(y, keep)
        ctx.relu = False
        return y if keep is None else y * keep

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        if ctx.relu:
            (gate,) = ctx.saved_tensors
            return grad * gate, None, None
        y, keep = ctx.saved_tensors
        local = 1 - y * y
        if keep is not None:
            local.mul_(keep)
        return grad * local, None, None


class StackedCNN:
    """The forward of ``M`` :func:`small_cnn` s at once, each on its own images.

    The first convolution is a batched matrix product over the model axis on the images'
    3×3 patches (:func:`patches`; one plain matrix product when all models share the
    images); the second and third are grouped convolutions (the model axis folded into
    the channels, ``[B, M*C, H, W]``, ``groups=M``), channels-last for the CPU's fast
    kernels. ``relu`` is a bool ``[M]`` (True: ReLU, False: tanh). Dropout (train only)
    acts after every conv activation with a rate per model (rounded to a multiple of
    ``2**-16``; 16 random bits per unit).

    Shapes:
        params: ``{name: [M, *shape]}``; x: ``[B, M, C, H, W]`` (own images per model) or
        ``[B, C, H, W]`` (shared) -> logits ``[B, M, 10]``. Instead of ``x``, ``own``
        may give each model's patches: ``[M, C*9, B, L]`` (see :func:`patches`).
    """

    def __init__(self, relu: Tensor) -> None:
        self.m = relu.numel()
        self.mixed = bool(relu.any()) and not bool(relu.all())
        self.all_relu = bool(relu.all())
        self.relu = relu

    def select(self, rows: Tensor) -> StackedCNN:
        """The stack of the models ``rows`` (a long index ``[m]``)."""
        return StackedCNN(self.relu[rows])

    def _activate(self, h: Tensor, keep: Tensor | None) -> Tensor:
        if not self.mixed:
            if torch.is_grad_enabled():
                return _ActDrop.apply(h, keep, self.all_relu)
            h = h.relu() if self.all_relu else _tanh(h)
            return h if keep is None else h.mul_(keep)
        channels = h.shape[1] // self.m
        relu = self.relu.repeat_interleave(channels).view(1, -1, 1, 1)
        h = torch.where(relu, h.relu(), _tanh(h))
        return h if keep is None else h * keep

    def _first(self, params: dict[str, Tensor], x: Tensor | None,
               own: Tensor | None) -> Tensor:
        """The first convolution's pre-activation, ``[B, M*16, H', W']`` channels-last."""
        m = self.m
        w, bias = params["0.weight"], params["0.bias"]  # [M, 16, C, 3, 3], [M, 16]
        if x is not None and x.dim() == 4:  # shared images: one matrix product
            b, side = x.shape[0], math.isqrt(_positions(x.shape[-1]))
            shared = patches(x).transpose(1, 2)  # [B, L, C*9]
            h = torch.addmm(bias.reshape(-1), shared.reshape(-1, shared.shape[-1]),
                            w.reshape(m * w.shape[1], -1).T)  # [B*L, M*16]
            return h.view(b, side, side, -1).permute(0, 3, 1, 2)  # channels-last
        if own is None:  # [B, M, C, H, W] -> [M, C*9, B, L]
            b = x.shape[0]
            own = patches(x.reshape(-1, *x.shape[2:])).view(b, m, -1, _positions(x.shape[-1])
                                                            ).permute(1, 2, 0, 3)
        _, k, b, positions = own.shape
        side = math.isqrt(positions)
        h = torch.baddbmm(bias.unsqueeze(2), w.reshape(m, -1, k), own.reshape(m, k, b * positions))
        # [M, 16, B, H', W'] -> [B, M*16, H', W'] in channels-last memory (B, H', W', M*16)
        h = h.view(m, -1, b, side, side).permute(2, 0, 1, 3, 4).reshape(b, -1, side, side)
        return h.contiguous(memory_format=torch.channels_last)

    def __call__(self, params: dict[str, Tensor], x: Tensor | None = None,
                 dropout: Tensor | None = None, generator: torch.Generator | None = None,
                 own: Tensor | None = None) -> Tensor:
        m = self.m
        h = self._first(params, x, own)
        b = h.shape[0]
        h = self._activate(h, _keep(h, dropout, generator))
        for key in ("2", "4"):
            w = params[f"{key}.weight"]
            w = w.reshape(-1, *w.shape[2:]).contiguous(memory_format=torch.channels_last)
            h = F.conv2d(h, w, params[f"{key}.bias"].reshape(-1), stride=2, groups=m)
            h = self._activate(h, _keep(h, dropout, generator))
        pooled = h.mean((2, 3)).view(b, m, -1)
        return torch.einsum("bmi,moi->bmo", pooled, params["8.weight"]) + params["8.bias"]


def _positions(side: int) -> int:
    """Output positions of a 3×3 stride-2 convolution on a ``side``-pixel square."""
    return ((side - 3) // 2 + 1) ** 2


def _keep(h: Tensor, p: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
    """Inverted dropout's ``mask / (1 - p)`` for ``h [B, M*C, H, W]`` (channels-last),
    rate ``p [M]`` per model rounded to a multiple of ``2**-16`` (None: no dropout).

    Sixteen random bits per unit (four per 64-bit draw), laid out like ``h``."""
    if p is None:
        return None
    b, channels, height, width = h.shape
    dropped = torch.round(p.double() * 65536)
    per_channel = channels // p.numel()
    threshold = (dropped - 32768).to(torch.int16).repeat_interleave(per_channel)
    scale = (65536 / (65536 - dropped)).to(h.dtype).repeat_interleave(per_channel)
    n = h.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=h.device)
    bits = bits.random_(-(2**63), 2**63 - 1, generator=generator)
    bits = bits.view(torch.int16)[:n].view(b, height, width, channels)
    keep = (bits >= threshold).to(h.dtype).mul_(scale)  # [B, H, W, M*C]
    return keep.permute(0, 3, 1, 2)  # channels-last, like h


# ----------------------------------------------------------------------------- training

def _pick(t: Tensor | None, rows: Tensor | None) -> Tensor | None:
    """``t [M, ...]`` restricted to the models ``rows`` (all when None)."""
    return t if t is None or rows is None else t[rows]


def _select(params: dict[str, Tensor], rows: Tensor | None) -> dict[str, Tensor]:
    """The stacked parameters of the models ``rows`` (all when None)."""
    return {k: _pick(v, rows) for k, v in params.items()}


def _active_rows(active: Tensor) -> Tensor | None:
    """Indices of the True entries of ``active [M]``, or None when all are."""
    return None if bool(active.all()) else active.nonzero().squeeze(1)


#: Images × models per evaluation forward (bounds the activations' size).
_EVAL_UNITS = 1024


def _own_patches(patches_of: Tensor, idx: Tensor) -> Tensor:
    """Each model's patches ``[m, C*9, b, L]`` of the images ``idx [m, b]``, from the
    patches of all images ``patches_of [N, C*9, L]`` (see :func:`patches`)."""
    return patches_of[idx].transpose(1, 2)


@torch.no_grad()
def evaluate_stack(model: StackedCNN, params: dict[str, Tensor], images: Tensor, labels: Tensor,
                   batch_size: int, index: Tensor | None = None,
                   valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Accuracy ``[M]`` and mean cross-entropy ``[M]`` (float64) of every model.

    Shapes: images ``[N, C, H, W]``, labels ``[N]``. Default: every model on all images.
    With ``index [M, n]`` (long) and ``valid [M, n]`` (bool, a prefix of each row),
    model ``m`` sees its own images ``images[index[m]]`` where ``valid[m]`` (e.g. its
    training subset); a batch runs only the models with images left in it.
    """
    m = model.m
    n = images.shape[0] if index is None else index.shape[1]
    correct, loss, count = (torch.zeros(m, dtype=torch.float64, device=images.device)
                            for _ in range(3))
    every = None if index is None else patches(images)  # [N, C*9, L], once
    # at most ~_EVAL_UNITS images × models per forward (cache-sized activations); the
    # per-image results do not depend on the split
    step = max(1, min(batch_size, _EVAL_UNITS // m))
    for start in range(0, n, step):
        stop = min(start + step, n)
        if index is None:
            rows = None
            y = labels[start:stop].unsqueeze(1).expand(-1, m)
            logits = model(params, images[start:stop])  # [b, M, K]
            w = torch.ones_like(y, dtype=torch.float32)
        else:
            rows = _active_rows(valid[:, start])
            idx = _pick(index, rows)[:, start:stop]
            y = labels[idx].T  # [b, m']
            sub = model if rows is None else model.select(rows)
            logits = sub(_select(params, rows), own=_own_patches(every, idx))
            w = _pick(valid, rows)[:, start:stop].T.float()
        logits = logits.float()
        hits = (logits.argmax(-1) == y).float()
        ce = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none")
        at = torch.arange(m, device=images.device) if rows is None else rows
        correct.index_add_(0, at, (hits * w).sum(0, dtype=torch.float64))
        loss.index_add_(0, at, (ce * w).sum(0, dtype=torch.float64))
        count.index_add_(0, at, w.sum(0, dtype=torch.float64))
    count = count.clamp(min=1)
    return correct / count, loss / count


@dataclass
class ChunkResult:
    """What training one chunk produced: per recorded step ``j`` (``cfg.steps`` order),
    ``weights[:, j]`` ``[M, S, P]`` float32 in the TF layout and the metrics ``[M, S]``."""

    runs: np.ndarray
    weights: np.ndarray
    test_accuracy: np.ndarray
    test_loss: np.ndarray
    train_accuracy: np.ndarray
    train_loss: np.ndarray


def _init_params(runs: list[dict], flat: ParamLayout, gen: torch.Generator,
                 device: torch.device) -> Tensor:
    """``[M, P]``: kernels ``N(0, std²)`` (truncated at ±2 std for TruncatedNormal), biases 0."""
    m = len(runs)
    theta = torch.zeros(m, flat.size, device=device)
    std = torch.tensor([r["init_std"] for r in runs], device=device)
    truncated = torch.tensor([r["w_init"] == "TruncatedNormal" for r in runs], device=device)
    for name, view in flat.views(theta).items():
        if name.endswith("weight"):
            normal = torch.randn(view.shape, generator=gen, device=device)
            cut = torch.nn.init.trunc_normal_(torch.empty_like(view), generator=gen)
            shape = (-1,) + (1,) * (view.dim() - 1)
            view.copy_(torch.where(truncated.view(shape), cut, normal) * std.view(shape))
    return theta


@dataclass
class _Subsets:
    """Each run's training subset of the ``N`` training images.

    ``member [M, N]`` bool; ``size [M]``; ``own [M, n]`` image indices with the subset
    first (``n = max(size)``); ``own_valid [M, n]`` marks the subset's entries.
    """

    member: Tensor
    size: Tensor
    own: Tensor
    own_valid: Tensor

    @classmethod
    def draw(cls, fractions: Tensor, n: int, gen: torch.Generator) -> _Subsets:
        """A random ``round(fraction * n)`` images (at least one) per run."""
        device = fractions.device
        size = (fractions.double() * n).round().long().clamp(1, n)
        perm = torch.rand(fractions.numel(), n, generator=gen, device=device).argsort(1)
        member = perm.argsort(1) < size.unsqueeze(1)  # in the permutation's first `size`
        own = perm[:, : int(size.max())]
        valid = torch.arange(own.shape[1], device=device) < size.unsqueeze(1)
        return cls(member, size, own, valid)

    def epoch_order(self, gen: torch.Generator) -> Tensor:
        """``[M, N]``: each run's subset first, freshly shuffled."""
        keys = torch.rand(self.member.shape, generator=gen, device=self.member.device)
        return keys.masked_fill_(~self.member, 2.0).argsort(1)


def _train_step(model: StackedCNN, params: dict[str, Tensor], data: dict[str, Tensor],
                idx: Tensor, valid: Tensor, rows: Tensor | None, l2: Tensor,
                dropout: Tensor | None, gen: torch.Generator | None) -> list[Tensor]:
    """Gradients (w.r.t. every model's parameters, zero for models not in ``rows``) of
    the mean cross-entropy on each model's batch plus ``l2 * Σ kernel²``.

    Shapes: ``idx [m', B]`` image indices and ``valid [m', B]`` of the models ``rows``.
    ``data`` holds ``train_x [N, C, H, W]``, ``train_y [N]`` and optionally
    ``train_patches`` (:func:`patches` of ``train_x``, computed here when absent).
    """
    sub = _select(params, rows)
    every = data.get("train_patches")
    if every is None:
        every = patches(data["train_x"])
    y = data["train_y"][idx].T  # [B, m']
    net = model if rows is None else model.select(rows)
    logits = net(sub, dropout=dropout, generator=gen, own=_own_patches(every, idx)).float()
    ce = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none")  # [B, m']
    loss = (ce * valid.T).sum(0) / valid.sum(1).clamp(min=1)
    loss = loss + l2 * sum(v.square().flatten(1).sum(1) for k, v in sub.items()
                           if k.endswith("weight"))
    return list(torch.autograd.grad(loss.sum(), list(params.values())))


def train_chunk(runs: list[dict], data: dict[str, Tensor], cfg: CNNZooConfig, chunk: int,
                layout: CNNLayout, device: torch.device,
                on_epoch: Callable[[int], None] | None = None) -> ChunkResult:
    """Train the runs of one chunk together; record weights and metrics at ``cfg.steps``.

    ``on_epoch(epoch)`` is called after each epoch (progress reporting).

    Randomness (init, training subsets, batch order, dropout) comes from one generator
    seeded by ``(cfg.seed, chunk)``: a chunk trains identically whenever it is redone.
    Each run trains on its own random ``train_fraction`` of the training images; an
    epoch is ``ceil(n_m / batch_size)`` steps over a fresh permutation of that subset
    (a short last batch). A step computes only the runs still in their epoch, so a
    chunk costs the sum of its runs' steps, whatever their train fractions.

    Shapes: ``data`` holds ``train_x [N, 1, H, W]``, ``train_y [N]``, ``test_x``,
    ``test_y`` on ``device``.
    """
    gen = torch.Generator(device=device).manual_seed(torch_seed(cfg.seed, chunk, 0xC4))
    m, flat = len(runs), ParamLayout.from_state(small_cnn().state_dict())
    col = lambda key, dtype=torch.float32: torch.tensor(  # noqa: E731
        [r[key] for r in runs], dtype=dtype, device=device)
    theta = _init_params(runs, flat, gen, device)
    params = {k: v.requires_grad_() for k, v in flat.views(theta).items()}
    model = StackedCNN(torch.tensor([r["activation"] == "relu" for r in runs], device=device))
    opt = StackedOptimizer([r["optimizer"] for r in runs], col("learning_rate", torch.float64),
                           torch.zeros(m, device=device), flat.size)
    l2, p_drop = col("l2reg"), col("dropout")
    p_drop = p_drop if bool((p_drop > 0).any()) else None
    subsets = _Subsets.draw(col("train_fraction"), data["train_x"].shape[0], gen)
    data = {**data, "train_patches": patches(data["train_x"])}
    steps_own = (subsets.size + cfg.batch_size - 1) // cfg.batch_size
    offsets = torch.arange(cfg.batch_size, device=device)
    records = []

    precision = compute_precision(device, cfg.dtype)

    def record() -> None:
        with precision:
            test = evaluate_stack(model, params, data["test_x"], data["test_y"],
                                  cfg.eval_batch_size)
            train = evaluate_stack(model, params, data["train_x"], data["train_y"],
                                   cfg.eval_batch_size, subsets.own, subsets.own_valid)
        state = {k: v.detach() for k, v in params.items()}
        records.append((torch_to_tf(state, layout), *(t.cpu().numpy() for t in (*test, *train))))

    if 0 in cfg.steps:
        record()
    for epoch in range(1, cfg.epochs + 1):
        order = subsets.epoch_order(gen)
        for s in range(int(steps_own.max())):
            active = s < steps_own
            rows = _active_rows(active)
            position = s * cfg.batch_size + offsets
            idx = _pick(order, rows)[:, position.clamp(max=order.shape[1] - 1)]
            valid = _pick(position.unsqueeze(0) < subsets.size.unsqueeze(1), rows).float()
            with precision:
                grads = _train_step(model, params, data, idx, valid, rows, _pick(l2, rows),
                                    _pick(p_drop, rows), gen)
            opt.step(theta, torch.cat([g.reshape(m, -1) for g in grads], 1),
                     torch.ones(m, device=device), active)
        if epoch in cfg.steps:
            record()
        if on_epoch is not None:
            on_epoch(epoch)
    weights, *metrics = (np.stack(x, axis=1) for x in zip(*records, strict=True))
    return ChunkResult(np.array([r["run"] for r in runs]), weights, *metrics)


# ----------------------------------------------------------------------------- zoo files

def _shard_path(root: Path, chunk: int) -> Path:
    return root / "shards" / f"chunk_{chunk:05d}.npz"


def _save_shard(path: Path, result: ChunkResult) -> None:
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **{f.name: getattr(result, f.name) for f in fields(result)})


def _load_shard(path: Path, runs: list[dict]) -> ChunkResult | None:
    """A completed chunk's results, or None when absent, unreadable or for other runs."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as shard:
            result = ChunkResult(**{k: shard[k] for k in shard.files})
    except Exception:  # an unreadable shard is simply trained again
        return None
    if result.runs.tolist() != [r["run"] for r in runs]:
        return None
    return result


_METRICS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss")


def _metrics_rows(runs: list[dict], metrics: dict[int, dict[str, np.ndarray]],
                  cfg: CNNZooConfig) -> list[dict]:
    """``metrics.csv`` rows, run-major, steps in ``cfg.steps`` order.

    ``metrics[run][name]`` is ``[len(steps)]`` for each name of :data:`_METRICS`.
    """
    rows = []
    for run in runs:
        for j, step in enumerate(cfg.steps):
            rows.append({
                "config.activation": run["activation"], "config.b_init": "zeros",
                "config.dataset": f"digits{cfg.image_size}", "config.dropout": run["dropout"],
                "config.init_std": run["init_std"], "config.l2reg": run["l2reg"],
                "config.learning_rate": run["learning_rate"],
                "config.optimizer": run["optimizer"],
                "config.train_fraction": run["train_fraction"], "config.w_init": run["w_init"],
                "modeldir": f"run_{run['run']:06d}", "step": step,
                **{name: float(metrics[run["run"]][name][j]) for name in _METRICS}})
    return rows


def _assemble(root: Path, runs: list[dict], chunks: list[list[dict]], cfg: CNNZooConfig,
              layout: CNNLayout) -> None:
    """``layout.csv``, ``weights.npy`` and (last, marking completion) ``metrics.csv``.

    ``weights.npy`` is streamed one shard at a time: row ``run * S + j`` sits at a
    fixed offset, so the zoo never has to fit in memory.
    """
    atomic_write_csv(root / "layout.csv", layout.rows(),
                     ("varname", "start_idx", "end_idx", "shape"))
    metrics = {}
    run_bytes = len(cfg.steps) * layout.size * 4
    with atomic_open(root / "weights.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {
            "descr": "<f4", "fortran_order": False,
            "shape": (len(runs) * len(cfg.steps), layout.size)})
        offset = handle.tell()
        for c, chunk in enumerate(chunks):
            result = _load_shard(_shard_path(root, c), chunk)
            if result is None:
                raise RuntimeError(f"{_shard_path(root, c)} vanished while assembling the zoo")
            for i, run in enumerate(result.runs.tolist()):
                handle.seek(offset + run * run_bytes)
                handle.write(np.ascontiguousarray(result.weights[i], dtype="<f4").tobytes())
                metrics[run] = {name: getattr(result, name)[i] for name in _METRICS}
    atomic_write_csv(root / "metrics.csv", _metrics_rows(runs, metrics, cfg), METRICS_COLUMNS)


def _open_zoo(root: Path, cfg: CNNZooConfig) -> None:
    """Check ``root/generator.json`` against ``cfg``, or write it for a new zoo."""
    spec = root / "generator.json"
    if spec.exists():
        check_identity(root, spec, cfg.identity())
        return
    if (root / "weights.npy").exists():
        raise ValueError(f"{root} has weights.npy but no generator.json: not a zoo written by "
                         "this generator; use another root")
    atomic_write_json(spec, {"generator": "neuralgraph_quasi.data.generate.cnn",
                             "format_version": _FORMAT_VERSION, "config": cfg.identity()})


def _is_complete(root: Path) -> bool:
    return all((root / name).exists() for name in ("layout.csv", "weights.npy", "metrics.csv"))


def _load_data(cfg: CNNZooConfig, device: torch.device) -> dict[str, Tensor]:
    train_x, train_y = load_digits(cfg.image_size, "train")
    test_x, test_y = load_digits(cfg.image_size, "test")
    return {"train_x": train_x.to(device), "train_y": train_y.to(device),
            "test_x": test_x.to(device), "test_y": test_y.to(device)}


def _train_chunks(root: Path, cfg: CNNZooConfig, chunks: list[list[dict]], todo: list[int],
                  layout: CNNLayout) -> None:
    """Train the chunks ``todo`` (on CPU ``workers`` at a time, each single-threaded),
    saving each one's shard as soon as it is done."""
    device = resolve_device(cfg.device)
    data = _load_data(cfg, device)

    def train(c: int, on_step: Callable[[float], None]) -> ChunkResult:
        per_epoch = len(chunks[c]) / max(cfg.epochs, 1)
        return train_chunk(chunks[c], data, cfg, c, layout, device,
                           on_epoch=lambda epoch: on_step(per_epoch))

    run_chunks(chunks, todo, train, lambda c, result: _save_shard(_shard_path(root, c), result),
               num_models=cfg.num_models, device=device, workers=cfg.workers,
               progress=cfg.progress, desc="CNN zoo")


def generate(cfg: CNNZooConfig | Mapping | None = None, **overrides) -> Path:
    """Generate (or resume, or confirm) the CNN zoo described by ``cfg``; return its root.

    ``cfg`` is a :class:`CNNZooConfig`, a mapping of its keys (a hydra ``DictConfig``
    works) or ``None`` for the defaults; ``overrides`` replace keys.

    Runs train in chunks of ``models_per_chunk`` (see :func:`chunk_plan`); each
    finished chunk is saved atomically as ``shards/chunk_<k>.npz``. When all chunks
    are done, ``layout.csv``, ``weights.npy`` and finally ``metrics.csv`` are written
    atomically and the shards removed. A restarted run trains only the chunks without
    a shard; a complete zoo is left alone; a different config (other than the runtime
    keys ``root``, ``device``, ``threads``, ``workers``, ``progress``, ``keep_shards``)
    in an existing root raises ``ValueError`` naming the differing keys. On CPU every
    chunk trains single-threaded (``workers`` of them at a time), so the same config
    gives byte-identical files on the same machine whatever ``threads`` and ``workers``
    (CUDA kernels need not be deterministic).
    """
    cfg = CNNZooConfig.from_any(cfg, **overrides)
    root = Path(cfg.root)
    _open_zoo(root, cfg)
    if _is_complete(root):
        print(f"CNN zoo at {root} is complete ({cfg.num_models} runs): nothing to do")
        return root
    layout = standard_layout()
    runs = sample_runs(cfg)
    chunks = chunk_plan(runs, cfg.models_per_chunk)
    todo = [c for c, chunk in enumerate(chunks)
            if _load_shard(_shard_path(root, c), chunk) is None]
    if todo:
        threads = torch.get_num_threads()
        try:
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            _train_chunks(root, cfg, chunks, todo, layout)
        finally:
            torch.set_num_threads(threads)
    _assemble(root, runs, chunks, cfg, layout)
    if not cfg.keep_shards:
        shutil.rmtree(root / "shards", ignore_errors=True)
    return root
