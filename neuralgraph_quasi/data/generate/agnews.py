"""Generate an AGNews-architecture transformer zoo in the published Small Transformer Zoo layout.

:func:`generate` trains ``num_models`` runs of
:class:`~neuralgraph_quasi.models.TransformerClassifier` (``embedding=None``) on
a frozen, shared embedding of a text corpus (synthetic, or the user's AG News
CSV), *many models at once*: the parameters of a chunk of ``models_per_chunk``
runs live in one ``[M, P]`` tensor, the forward is batched matmuls over the
model axis (:class:`StackedTransformer`), and the four optimizers are one
vectorised update rule with per-model coefficients (:class:`StackedOptimizer`).

Layout written under ``root`` (as published, plus what re-evaluation needs)::

    ag_news/<run>_<epoch>_<int(acc*10000)>.pt   state_dict of one checkpoint
    metadata/ag_news.csv    one row per checkpoint: run config, ckpt_epoch, ckpt_file,
                            test_accuracy (plus test_loss, train_loss)
    embedding.pt            FrozenEmbedding state: token [V, 32], position [max_len, 32]
    corpus.pt               Corpus state: token ids and labels of both splits, vocab
    generator.json          the full generator config (identity of the zoo)
    README.md               which corpus, how to re-evaluate a member

Writes are atomic and per chunk (checkpoints first, then the chunk's metadata
rows), so an interrupted run resumes where it stopped; see :func:`generate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ...models import TransformerClassifier
from .._atomic import atomic_torch_save, atomic_write_json, atomic_write_text, fsync_paths
from .corpus import (
    Corpus,
    FrozenEmbedding,
    csv_corpus,
    lsa_embedding,
    sha256,
    sinusoidal_positions,
    synthetic_corpus,
    synthetic_embedding,
)

__all__ = ["AGNewsZooConfig", "generate", "sample_runs", "ParamLayout", "StackedTransformer",
           "StackedOptimizer", "Dropout", "lr_schedule", "train_chunk", "ChunkResult",
           "evaluate_stack", "plan_chunks", "load_zoo_inputs", "METADATA_COLUMNS", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "rmsprop", "sgd", "sgd_momentum")
DIM, HEADS = 32, 2  # the AGNews architecture (TransformerClassifier's defaults)
METADATA_COLUMNS = ("run", "optimizer", "lr", "w_init_std", "l2_regularize", "train_fraction",
                    "dropout", "epochs", "batch_size", "seed", "num_classes", "ckpt_epoch",
                    "ckpt_file", "test_accuracy", "test_loss", "train_loss")
_RUNTIME_KEYS = ("root", "device", "workers", "progress")  # may change between runs of a zoo
METADATA = Path("metadata") / "ag_news.csv"


# ----------------------------------------------------------------------------- config

@dataclass
class AGNewsZooConfig:
    """Everything that defines an AGNews zoo. Defaults: the CPU zoo (1,000 runs, minutes).

    Corpus (``csv`` unset: synthetic):
        csv / test_csv: AG News CSV(s) (``Class Index``, ``Title``, ``Description``);
            without ``test_csv`` a seeded ``test_fraction`` of ``csv`` is held out.
        train_docs / test_docs: documents per split (CSV: a seeded subset, ``None`` all).
        max_len: tokens per document after truncation/padding.
        doc_len, topic_words, neutral_words, topic_density, confusion, label_noise,
            topic_spread: synthetic corpus and embedding (see :mod:`.corpus`).
        min_count, max_vocab, embedding_noise: CSV vocabulary and LSA embedding.
        num_classes: classifier outputs (``None``: the corpus's classes; may be larger,
            e.g. 10 as in the published sweep files).

    Training: ``epochs`` (passes over each run's own training subset), ``ckpt_epochs``
    (saved and evaluated; each <= epochs), ``batch_size``, linear warm-up over
    ``warmup_fraction`` of each run's steps, then cosine decay to 0.

    Sweep (per run, seeded): ``optimizers``; ``lr_range[optimizer]`` (log-uniform);
    ``w_init_std``, ``l2_regularize``, ``train_fraction``, ``dropout`` (uniform choice
    from each grid). Weights start trunc-normal (+-2 std), biases at zero; L2 is added
    to the gradient (``weight_decay`` of torch's optimizers).

    Execution: ``models_per_chunk`` runs trained at once (bounds memory; part of the
    zoo's identity since it sets the random streams; raise it on a GPU, e.g. 1024),
    ``eval_batch_size`` test documents per forward, ``device`` (``"auto"``: CUDA when
    available), ``workers`` (CPU only: chunks trained concurrently in threads, each with
    one intra-op thread; ``None``: ``torch.get_num_threads()``; the files do not depend
    on it), ``progress`` (tqdm bar). The runtime keys ``root``, ``device``, ``workers``
    and ``progress`` may change between runs of one zoo; every other key must match
    ``root/generator.json``.
    """

    root: str = "zoo/agnews"
    num_models: int = 1000
    seed: int = 0
    # corpus
    csv: str | None = None
    test_csv: str | None = None
    train_docs: int | None = 700
    test_docs: int | None = 400
    max_len: int = 24
    doc_len: tuple[int, int] = (16, 24)
    topic_words: int = 150
    neutral_words: int = 600
    topic_density: tuple[float, float] = (0.1, 0.4)
    confusion: float = 0.05
    label_noise: float = 0.05
    topic_spread: float = 0.6
    test_fraction: float = 0.2
    min_count: int = 2
    max_vocab: int = 20000
    embedding_noise: float = 0.1
    num_classes: int | None = None
    # training
    epochs: int = 3
    ckpt_epochs: tuple[int, ...] = (1, 2, 3)
    batch_size: int = 16
    warmup_fraction: float = 0.1
    # sweep
    optimizers: tuple[str, ...] = OPTIMIZERS
    lr_range: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "adam": (1e-4, 1e-2), "rmsprop": (5e-5, 3e-3), "sgd": (5e-3, 0.3),
        "sgd_momentum": (5e-4, 3e-2)})
    w_init_std: tuple[float, ...] = (0.08, 0.12, 0.2, 0.3, 0.5)
    l2_regularize: tuple[float, ...] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2)
    train_fraction: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7)
    dropout: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2)
    # execution
    models_per_chunk: int = 64
    eval_batch_size: int = 50
    device: str = "auto"
    workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        bad = sorted(set(self.optimizers) - set(OPTIMIZERS))
        if bad or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty subset of {OPTIMIZERS}, got {bad}")
        missing = [o for o in self.optimizers if o not in self.lr_range]
        if missing:
            raise ValueError(f"lr_range has no range for optimizers {missing}")
        if not self.ckpt_epochs or not all(1 <= e <= self.epochs for e in self.ckpt_epochs):
            raise ValueError(f"ckpt_epochs {self.ckpt_epochs} must lie in 1..epochs={self.epochs}")
        if self.num_models < 1 or self.models_per_chunk < 1 or self.batch_size < 1:
            raise ValueError("num_models, models_per_chunk and batch_size must be >= 1")

    @classmethod
    def from_any(cls, cfg: AGNewsZooConfig | Mapping | None = None, **overrides) -> AGNewsZooConfig:
        """A config from a dataclass, a mapping (e.g. a hydra ``DictConfig``) or keywords."""
        if isinstance(cfg, AGNewsZooConfig):
            data = asdict(cfg)
        else:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
            data = dict(cfg or {})
        data.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AGNews zoo config keys: {unknown}")
        data = {k: _freeze(v) for k, v in data.items()}
        return cls(**data)

    def identity(self) -> dict:
        """The keys that define the zoo's contents, JSON-normalised (tuples become lists)."""
        data = {k: v for k, v in asdict(self).items() if k not in _RUNTIME_KEYS}
        return json.loads(json.dumps(data))


def _freeze(value):
    """Lists (from JSON/hydra) to tuples, recursively; mappings to plain dicts."""
    if isinstance(value, Mapping):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_freeze(v) for v in value)
    return value


def sample_runs(cfg: AGNewsZooConfig) -> list[dict]:
    """The hyperparameters of every run, each drawn from its own seeded generator.

    Returns:
        ``num_models`` dicts with keys ``run``, ``optimizer``, ``lr``, ``w_init_std``,
        ``l2_regularize``, ``train_fraction``, ``dropout`` (run ``r`` does not depend
        on ``num_models``).
    """
    runs = []
    for run in range(cfg.num_models):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, run, 0x5E]))
        opt = cfg.optimizers[rng.integers(len(cfg.optimizers))]
        lo, hi = cfg.lr_range[opt]
        runs.append({
            "run": run, "optimizer": opt,
            "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            **{key: float(rng.choice(getattr(cfg, key)))
               for key in ("w_init_std", "l2_regularize", "train_fraction", "dropout")}})
    return runs


# ----------------------------------------------------------------------------- stacked model

@dataclass(frozen=True)
class ParamLayout:
    """Where each state_dict entry of a member lives in a flat ``[M, P]`` parameter tensor.

    Names, shapes and order are those of ``TransformerClassifier(num_classes=C).state_dict()``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def for_classes(cls, num_classes: int) -> ParamLayout:
        state = TransformerClassifier(DIM, num_classes=num_classes).state_dict()
        shapes = tuple(tuple(t.shape) for t in state.values())
        sizes = [math.prod(s) for s in shapes]
        offsets = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
        return cls(tuple(state), shapes, offsets, sum(sizes))

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
    r"""The forward of ``M`` :class:`TransformerClassifier` s at once (``embedding=None``).

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

@torch.no_grad()
def evaluate_stack(model: StackedTransformer, params: dict[str, Tensor], embed: FrozenEmbedding,
                   tokens: Tensor, labels: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Correct counts ``[M]`` int64 and mean cross-entropy ``[M]`` on ``(tokens, labels)``.

    Shapes: tokens ``[N, T]``, labels ``[N]``, both on the parameters' device.
    """
    correct, loss = 0, 0.0
    for start in range(0, tokens.shape[0], batch_size):
        ids, y = tokens[start: start + batch_size], labels[start: start + batch_size]
        logits = model(params, embed(ids))  # [M, B, C]
        correct = correct + (logits.argmax(-1) == y).sum(1)
        loss = loss + F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1),
                                      reduction="none").sum(1)
    return correct, loss / tokens.shape[0]


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


def _torch_seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def _runs_tensor(runs: list[dict], key: str, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``[M]``: one hyperparameter of every run."""
    return torch.tensor([r[key] for r in runs], dtype=dtype, device=device)


def _init_theta(runs: list[dict], layout: ParamLayout, gen: torch.Generator,
                device: torch.device) -> Tensor:
    """``[M, P]``: weights trunc-normal (+-2 std) with each run's ``w_init_std``, biases 0."""
    theta = torch.empty(len(runs), layout.size, device=device)
    torch.nn.init.trunc_normal_(theta, std=1.0, a=-2.0, b=2.0, generator=gen)
    theta.mul_(_runs_tensor(runs, "w_init_std", device).unsqueeze(1))
    return theta.masked_fill_(layout.is_bias(device), 0.0)


class _Batches:
    """Each run's random training subset and, per epoch, its shuffled batches.

    Run ``m`` owns ``n_m = round(train_fraction_m * N)`` documents and takes
    ``steps_m = ceil(n_m / B)`` steps per epoch; its last batch wraps around to the
    start of its permutation. Shapes: ``epoch_order() [M, N]``, ``batch(...) [M, B]``.
    """

    def __init__(self, runs: list[dict], n_docs: int, batch_size: int, gen: torch.Generator,
                 device: torch.device) -> None:
        self.gen, self.n_docs, self.m = gen, n_docs, len(runs)
        frac = _runs_tensor(runs, "train_fraction", device, torch.float64)
        self.n_own = (frac * n_docs).round().long().clamp(1, n_docs)
        rank = torch.rand(self.m, n_docs, generator=gen, device=device).argsort(1).argsort(1)
        self.member = rank < self.n_own.unsqueeze(1)
        self.steps = (self.n_own + batch_size - 1) // batch_size
        self.offsets = torch.arange(batch_size, device=device)

    def epoch_order(self) -> Tensor:
        """A fresh permutation per run with its own documents first."""
        keys = torch.rand(self.m, self.n_docs, generator=self.gen, device=self.member.device)
        return keys.masked_fill_(~self.member, 2.0).argsort(1)

    def batch(self, order: Tensor, step: int) -> Tensor:
        pos = (step * self.offsets.numel() + self.offsets) % self.n_own.unsqueeze(1)
        return order.gather(1, pos)


def train_chunk(runs: list[dict], corpus: Corpus, embed: FrozenEmbedding, cfg: AGNewsZooConfig,
                chunk: int, num_classes: int, device: torch.device,
                on_step: Callable[[float], None] | None = None) -> ChunkResult:
    """Train the runs of one chunk together; evaluate and snapshot at ``cfg.ckpt_epochs``.

    Randomness (init, training subsets, batch order, dropout) comes from one generator
    seeded by ``(cfg.seed, chunk)``: a chunk trains identically whenever it is redone
    (on the same device). Runs with fewer steps than others in an epoch sit out the
    remaining steps (see :class:`_Batches`; :func:`plan_chunks` makes this rare).
    ``on_step(models)`` is called after every step with the progress made, in models;
    it may raise to abort.
    """
    gen = torch.Generator(device=device).manual_seed(_torch_seed(cfg.seed, chunk, 0x7A))
    m, layout = len(runs), ParamLayout.for_classes(num_classes)
    model = StackedTransformer(layout)
    theta = _init_theta(runs, layout, gen, device)
    params = {k: v.requires_grad_() for k, v in layout.views(theta).items()}
    opt = StackedOptimizer([r["optimizer"] for r in runs],
                           _runs_tensor(runs, "lr", device, torch.float64),
                           _runs_tensor(runs, "l2_regularize", device), layout.size)
    dropout = None
    if any(r["dropout"] > 0 for r in runs):
        dropout = Dropout.from_rates(_runs_tensor(runs, "dropout", device), gen)
    train_x, train_y = corpus.train_tokens.to(device), corpus.train_labels.to(device)
    test_x, test_y = corpus.test_tokens.to(device), corpus.test_labels.to(device)
    batches = _Batches(runs, train_x.shape[0], cfg.batch_size, gen, device)
    total, max_steps = batches.steps * cfg.epochs, int(batches.steps.max())

    result = ChunkResult({}, {}, {}, {})
    for epoch in range(1, cfg.epochs + 1):
        order = batches.epoch_order()
        loss_sum = torch.zeros(m, device=device)
        for step in range(max_steps):
            active = step < batches.steps
            idx = batches.batch(order, step)  # [M, B]
            logits = model(params, embed(train_x[idx]), dropout)
            losses = F.cross_entropy(logits.transpose(1, 2), train_y[idx], reduction="none")
            losses = losses.mean(1)  # [M]
            grads = torch.autograd.grad(losses.sum(), list(params.values()))
            opt.step(theta, torch.cat([g.reshape(m, -1) for g in grads], 1),
                     lr_schedule(opt.step_count, total, cfg.warmup_fraction), active)
            loss_sum += losses.detach() * active
            if on_step is not None:
                on_step(m / (cfg.epochs * max_steps))
        if epoch in cfg.ckpt_epochs:
            correct, test_loss = evaluate_stack(model, params, embed, test_x, test_y,
                                                cfg.eval_batch_size)
            result.weights[epoch] = theta.detach().to("cpu", copy=True)
            result.correct[epoch] = correct.cpu()
            result.test_loss[epoch] = test_loss.cpu()
            result.train_loss[epoch] = (loss_sum / batches.steps).cpu()
    return result


# ----------------------------------------------------------------------------- zoo files

_CKPT_NAME = re.compile(r"(\d+)_(\d+)_(\d+)\.pt")  # run, epoch, int(acc*10000)


def _ckpt_name(run: int, epoch: int, correct: int, total: int) -> str:
    """``ag_news/<run>_<epoch>_<int(acc*10000)>.pt``, the accuracy field floored exactly."""
    return f"ag_news/{run}_{epoch}_{correct * 10000 // total}.pt"


def _read_metadata(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_metadata(path: Path, rows: list[dict]) -> None:
    """Atomically replace the metadata CSV by ``rows`` (old rows plus a chunk's new ones)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _chunk_rows(runs: list[dict], result: ChunkResult, cfg: AGNewsZooConfig,
                num_classes: int, n_test: int) -> list[dict]:
    """Metadata rows of a trained chunk (run-major, epochs ascending)."""
    rows = []
    for i, run in enumerate(runs):
        for epoch in sorted(result.weights):
            correct = int(result.correct[epoch][i])
            rows.append({
                **run, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "num_classes": num_classes, "ckpt_epoch": str(epoch),
                "ckpt_file": _ckpt_name(run["run"], epoch, correct, n_test),
                "test_accuracy": correct / n_test,
                "test_loss": float(result.test_loss[epoch][i]),
                "train_loss": float(result.train_loss[epoch][i])})
    return rows


def _write_checkpoints(root: Path, chunk: list[dict], rows: list[dict], result: ChunkResult,
                       layout: ParamLayout) -> None:
    """Write a chunk's checkpoint files, removing stale files of its runs first."""
    position = {run["run"]: i for i, run in enumerate(chunk)}
    keep = {r["ckpt_file"] for r in rows}
    for stale in (root / "ag_news").glob("*.pt"):
        match = _CKPT_NAME.fullmatch(stale.name)
        if match and int(match[1]) in position and f"ag_news/{stale.name}" not in keep:
            stale.unlink()
    for row in rows:
        weights = result.weights[int(row["ckpt_epoch"])][position[row["run"]]]
        atomic_torch_save(layout.state_dict(weights), root / row["ckpt_file"], fsync=False)
    fsync_paths([root / row["ckpt_file"] for row in rows])  # one batch: durable before the CSV


def _readme(cfg: AGNewsZooConfig, corpus: Corpus, source: str) -> str:
    return f"""# AGNews transformer zoo (generated by `neuralgraph_quasi`)

Corpus: **{source}**.
{corpus.train_tokens.shape[0]} training and {corpus.test_tokens.shape[0]} test documents, \
{len(corpus.vocab)} token ids, {corpus.num_classes} classes, {corpus.max_len} tokens per \
document.

{cfg.num_models} runs of `TransformerClassifier(num_classes=...)` (2 blocks, 2 heads, dim 32, \
no residuals; `embedding=None`), checkpoints at epochs {list(cfg.ckpt_epochs)}, published \
Small Transformer Zoo layout: `ag_news/<run>_<epoch>_<int(acc*10000)>.pt` and \
`metadata/ag_news.csv` (`ckpt_file` is relative to this directory).

Members take embedded tokens. To re-evaluate one:

```python
import torch
from neuralgraph_quasi.models import TransformerClassifier
corpus = torch.load("corpus.pt", weights_only=True)
emb = torch.load("embedding.pt", weights_only=True)
x = emb["token"][corpus["test_tokens"]] + emb["position"][: corpus["test_tokens"].shape[1]]
model = TransformerClassifier(num_classes=NUM_CLASSES)  # the metadata's num_classes
model.load_state_dict(torch.load(CKPT_FILE, weights_only=True))
acc = (model(x).argmax(-1) == corpus["test_labels"]).float().mean()
```

Token id 0 pads (every document is padded at the end to {corpus.max_len} tokens; its \
embedding row is zero, so a pad slot carries its position vector alone; no mask). \
`generator.json` holds the generator config; the same config and seed reproduce every file.
"""


def load_zoo_inputs(root: str | Path) -> tuple[Corpus, FrozenEmbedding]:
    """The stored corpus and frozen embedding of a generated zoo."""
    root = Path(root)
    corpus = Corpus.from_state(torch.load(root / "corpus.pt", weights_only=True))
    return corpus, FrozenEmbedding.from_state(torch.load(root / "embedding.pt",
                                                         weights_only=True))


def _build_inputs(cfg: AGNewsZooConfig) -> tuple[Corpus, FrozenEmbedding, str]:
    """The corpus, its frozen embedding and a one-line description of the source."""
    if cfg.csv is None:
        if cfg.train_docs is None or cfg.test_docs is None:
            raise ValueError("the synthetic corpus needs train_docs and test_docs (None means "
                             "'all rows' and applies to a CSV only)")
        corpus = synthetic_corpus(cfg.train_docs, cfg.test_docs, cfg.seed, 4,
                                  cfg.topic_words, cfg.neutral_words, tuple(cfg.doc_len),
                                  cfg.max_len, tuple(cfg.topic_density), cfg.confusion,
                                  cfg.label_noise)
        token = synthetic_embedding(corpus.topic_of_word, cfg.seed, DIM, cfg.topic_spread)
        source = "synthetic 4-topic corpus (neuralgraph_quasi.data.generate.corpus)"
    else:
        corpus = csv_corpus(cfg.csv, cfg.seed, cfg.test_csv, cfg.train_docs, cfg.test_docs,
                            cfg.test_fraction, cfg.max_len, cfg.min_count, cfg.max_vocab)
        token = lsa_embedding(corpus.train_tokens, len(corpus.vocab), cfg.seed, DIM,
                              cfg.embedding_noise)
        files = [cfg.csv] + ([cfg.test_csv] if cfg.test_csv else [])
        source = "user AG News CSV: " + ", ".join(f"`{f}` (sha256 {sha256(f)})" for f in files)
    return corpus, FrozenEmbedding(token, sinusoidal_positions(cfg.max_len, DIM)), source


def _open_zoo(root: Path, cfg: AGNewsZooConfig) -> tuple[Corpus, FrozenEmbedding]:
    """Check or initialise ``root``; return the zoo's corpus and embedding.

    ``generator.json`` is written last, so its presence means the static files are complete.
    """
    spec = root / "generator.json"
    if spec.exists():
        stored = json.loads(spec.read_text())["config"]
        new = cfg.identity()
        diff = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
        if diff:
            detail = "; ".join(f"{k}: zoo has {stored.get(k)!r}, config has {new.get(k)!r}"
                               for k in diff)
            raise ValueError(f"{root} holds a zoo generated with a different config "
                             f"(differing keys: {', '.join(diff)}). {detail}. Use another root "
                             "or the zoo's own config.")
        return load_zoo_inputs(root)
    if (root / METADATA).exists():
        raise ValueError(f"{root} has metadata/ag_news.csv but no generator.json: not a zoo "
                         "written by this generator; use another root")
    corpus, embed, source = _build_inputs(cfg)
    atomic_torch_save(corpus.state(), root / "corpus.pt")
    atomic_torch_save(embed.state(), root / "embedding.pt")
    atomic_write_text(root / "README.md", _readme(cfg, corpus, source))
    atomic_write_json(spec, {"generator": "neuralgraph_quasi.data.generate.agnews",
                             "corpus": source, "config": cfg.identity()})
    return corpus, embed


def _resolve_device(name: str) -> torch.device:
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


def plan_chunks(runs: list[dict], size: int) -> list[list[dict]]:
    """Split the runs into chunks of ``size`` trained together.

    Runs are ordered by train fraction (largest first), then by run index, so that a
    chunk's runs take the same number of steps per epoch: a run with fewer steps than
    its chunk would compute in the others' extra steps for nothing.
    """
    ordered = sorted(runs, key=lambda r: (-r["train_fraction"], r["run"]))
    return [ordered[i: i + size] for i in range(0, len(ordered), size)]


def _save_chunk(root: Path, rows: list[dict], chunk: list[dict], result: ChunkResult,
                cfg: AGNewsZooConfig, layout: ParamLayout, n_test: int) -> list[dict]:
    """Write a chunk's checkpoints, then the metadata with its rows; return all rows."""
    num_classes = layout.shapes[layout.names.index("classifier.fc2.weight")][0]
    new_rows = _chunk_rows(chunk, result, cfg, num_classes, n_test)
    _write_checkpoints(root, chunk, new_rows, result, layout)
    runs = {r["run"] for r in chunk}
    rows = [r for r in rows if int(r["run"]) not in runs] + new_rows
    rows.sort(key=lambda r: (int(r["run"]), int(r["ckpt_epoch"])))
    _write_metadata(root / METADATA, rows)
    return rows


def generate(cfg: AGNewsZooConfig | Mapping | None = None, **overrides) -> Path:
    """Generate (or resume, or confirm) the zoo described by ``cfg``; return its root.

    ``cfg`` is an :class:`AGNewsZooConfig`, a mapping of its keys (a hydra
    ``DictConfig`` works) or ``None`` for the defaults; ``overrides`` replace keys.

    Runs are trained in chunks of ``models_per_chunk`` (see :func:`plan_chunks`; on CPU
    ``workers`` chunks at a time, each single-threaded). For each chunk the checkpoint
    files are written first (atomically), then ``metadata/ag_news.csv`` is atomically
    rewritten with the chunk's rows added. On restart, chunks whose rows are all present
    are skipped; a chunk without rows is trained again from scratch and its stray
    checkpoint files replaced.
    A complete zoo is left alone; a different config (other than the runtime keys
    ``root``, ``device``, ``workers``, ``progress``) in an existing root raises
    ``ValueError`` naming the differing keys.
    """
    cfg = AGNewsZooConfig.from_any(cfg, **overrides)
    root = Path(cfg.root)
    device = _resolve_device(cfg.device)
    corpus, embed = _open_zoo(root, cfg)
    embed = embed.to(device)
    num_classes = cfg.num_classes or corpus.num_classes
    if num_classes < corpus.num_classes:
        raise ValueError(f"num_classes={num_classes} < the corpus's {corpus.num_classes} classes")
    layout = ParamLayout.for_classes(num_classes)
    runs = sample_runs(cfg)
    rows = _read_metadata(root / METADATA)
    have = {(int(r["run"]), r["ckpt_epoch"]) for r in rows}
    chunks = plan_chunks(runs, cfg.models_per_chunk)
    todo = [c for c, chunk in enumerate(chunks)
            if not all((r["run"], str(e)) in have for r in chunk for e in cfg.ckpt_epochs)]
    if not todo:
        print(f"AGNews zoo at {root} is complete ({cfg.num_models} runs, {len(rows)} "
              "checkpoints): nothing to do")
        return root

    cpu = device.type == "cpu"
    workers = min(len(todo), (cfg.workers or torch.get_num_threads()) if cpu else 1)
    done = cfg.num_models - sum(len(chunks[c]) for c in todo)
    stop, lock, progress = threading.Event(), threading.Lock(), [0.0] * len(chunks)
    with (tqdm(total=cfg.num_models, initial=done, unit="model", desc="AGNews zoo",
               disable=not cfg.progress, smoothing=0.05, bar_format=_BAR) as bar,
          _intra_op_threads(1 if cpu else None),
          ThreadPoolExecutor(workers, thread_name_prefix="agnews-zoo") as pool):

        def advance(c: int, models: float) -> None:
            if stop.is_set():
                raise _Stopped
            with lock:
                progress[c] += models
                bar.update(models)

        futures = {pool.submit(train_chunk, chunks[c], corpus, embed, cfg, c, num_classes,
                               device, partial(advance, c)): c for c in todo}
        try:
            for future in as_completed(futures):
                c = futures[future]
                rows = _save_chunk(root, rows, chunks[c], future.result(), cfg, layout,
                                   corpus.test_labels.numel())
                with lock:  # saved chunks count exactly (no float drift in the bar)
                    progress[c] = len(chunks[c])
                    bar.n = done + sum(progress)
                    bar.refresh()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    return root
