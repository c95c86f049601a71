"""Generate an MNIST-Transformers zoo in the published Small Transformer Zoo layout.

:func:`generate` trains ``num_models`` runs of
``TransformerClassifier(num_classes=10, embedding=PatchEmbedding())`` on scikit-learn's
handwritten digits upsampled to 28×28 (:func:`~neuralgraph_quasi.data.images.load_digits`;
bundled with scikit-learn, so no download), *many models at once*, with the pieces of
:mod:`._stacked` (batched forward, one vectorised optimizer for Adam/RMSprop/SGD/SGD with
momentum, per-model dropout, chunked threaded training, atomic per-chunk writes).

Each member trains its own patch embedding: ``conv1`` (4×4, stride 4) is a linear map
over the 49 non-overlapping 16-pixel patches, so the images are unfolded once
(``[N, 49, 16]``) and the chunk's convolutions are one batched matmul
(:class:`StackedPatchTransformer`). The positional table is fixed (sinusoidal ``[49, 32]``)
and stored in every checkpoint as ``embedding.pos_embedding``.

Layout written under ``root`` (as published, plus what re-evaluation needs)::

    mnist/<run>_<epoch>_<int(acc*10000)>.pt   state_dict of one checkpoint
    metadata/mnist.csv      one row per checkpoint: run config, ckpt_epoch, ckpt_file,
                            test_top1_accuracy (plus test_loss, train_loss)
    generator.json          the full generator config (identity of the zoo) and the data
    README.md               the data, how to re-evaluate a member

Writes are atomic and per chunk (checkpoints first, then the chunk's metadata rows), so
an interrupted run resumes where it stopped; a complete zoo is left alone; another
config in the same root raises, naming the differing keys (see :func:`generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...models import PatchEmbedding, TransformerClassifier
from .._atomic import atomic_write_csv, atomic_write_json, atomic_write_text
from ..images import DIGITS_SPLIT_SEED, load_digits
from ._stacked import (
    DROPOUT_GRID,
    L2_GRID,
    TRAIN_FRACTION_GRID,
    ChunkResult,
    Dropout,
    ParamLayout,
    StackedTransformer,
    ZooConfigBase,
    check_identity,
    check_sweep,
    chunk_rows,
    evaluate_logits,
    plan_chunks,
    read_metadata,
    resolve_device,
    run_chunks,
    sample_runs,
    save_chunk,
    torch_seed,
    train_stack,
)
from .corpus import sinusoidal_positions

__all__ = ["MNISTZooConfig", "generate", "StackedPatchTransformer", "member_layout",
           "member_state", "patches", "load_images", "train_chunk", "METADATA_COLUMNS"]

NUM_CLASSES, SIZE, PATCH, DIM = 10, 28, 4, 32
NUM_PATCHES = (SIZE // PATCH) ** 2  # 49
POS_KEY = "embedding.pos_embedding"
METADATA_COLUMNS = ("run", "optimizer", "lr", "w_init_std", "l2_regularize", "train_fraction",
                    "dropout", "epochs", "batch_size", "seed", "num_classes", "ckpt_epoch",
                    "ckpt_file", "test_top1_accuracy", "test_loss", "train_loss")
METADATA = Path("metadata") / "mnist.csv"
SUBDIR = "mnist"


# ----------------------------------------------------------------------------- config

@dataclass
class MNISTZooConfig(ZooConfigBase):
    """Everything that defines an MNIST-Transformers zoo. Defaults: a CPU zoo (minutes).

    Data: scikit-learn's digits at 28×28 (``load_digits(28, split)``: 1,347 train, 450
    test images, fixed split); ``train_images`` / ``test_images`` keep a seeded subset
    of each split (``None``: all).

    Training: ``epochs`` (passes over each run's own training subset), ``ckpt_epochs``
    (saved and evaluated; each <= epochs), ``batch_size``, linear warm-up over
    ``warmup_fraction`` of each run's steps, then cosine decay to 0.

    Sweep (per run, seeded; as for AGNews): ``optimizers``; ``lr_range[optimizer]``
    (log-uniform); ``w_init_std``, ``l2_regularize``, ``train_fraction``, ``dropout``
    (uniform choice from each grid). Weights (the patch convolution included) start
    trunc-normal (+-2 std), biases at zero; L2 is added to the gradient.

    Execution: ``models_per_chunk`` runs trained at once (part of the zoo's identity:
    it sets the random streams), ``eval_batch_size`` test images per forward, ``device``
    (``"auto"``: CUDA when available), ``workers`` (CPU: chunks trained concurrently in
    threads, one intra-op thread each; ``None``: ``torch.get_num_threads()``),
    ``progress``. The runtime keys ``root``, ``device``, ``workers`` and ``progress``
    may change between runs of one zoo; every other key must match ``generator.json``.
    """

    root: str = "data/mnist_tf"
    num_models: int = 256
    seed: int = 0
    # data
    train_images: int | None = 600
    test_images: int | None = None
    # training
    epochs: int = 4
    ckpt_epochs: tuple[int, ...] = (1, 2, 4)
    batch_size: int = 8
    warmup_fraction: float = 0.1
    # sweep
    # {adam, rmsprop}: one of the published sweeps; with this step budget every plain-SGD and
    # SGD-momentum run stayed at chance (measured), which only adds ties to the ranking task.
    optimizers: tuple[str, ...] = ("adam", "rmsprop")
    lr_range: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "adam": (3e-4, 5e-3), "rmsprop": (1e-4, 2e-3), "sgd": (0.05, 1.0),
        "sgd_momentum": (5e-3, 0.1)})
    w_init_std: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)  # below ~0.15 runs stay at chance
    l2_regularize: tuple[float, ...] = L2_GRID
    train_fraction: tuple[float, ...] = TRAIN_FRACTION_GRID
    dropout: tuple[float, ...] = DROPOUT_GRID
    # execution
    models_per_chunk: int = 64
    eval_batch_size: int = 150
    device: str = "auto"
    workers: int | None = None
    progress: bool = True

    _label = "MNIST"  # class attributes (no annotation): not config keys

    def __post_init__(self) -> None:
        check_sweep(self)
        for key in ("train_images", "test_images"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 or None")


# ----------------------------------------------------------------------------- data

def patches(images: Tensor) -> Tensor:
    """``[N, 1, 28, 28]`` -> ``[N, 49, 16]``: the 4×4 patches in ``conv1``'s order.

    Patch ``p`` is output position ``p`` of the stride-4 convolution (row-major), and
    its 16 pixels are ordered as ``conv1.weight[o].flatten()``.
    """
    return F.unfold(images, PATCH, stride=PATCH).transpose(1, 2).contiguous()


def _subset(n: int, keep: int | None, seed: int, salt: int) -> Tensor:
    if keep is None or keep >= n:
        return torch.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, salt]))
    return torch.from_numpy(np.sort(rng.choice(n, keep, replace=False)))


def load_images(cfg: MNISTZooConfig, split: str) -> tuple[Tensor, Tensor]:
    """The zoo's ``split`` images ``[N, 1, 28, 28]`` and labels ``[N]`` (subset per cfg)."""
    images, labels = load_digits(SIZE, split)
    keep = cfg.train_images if split == "train" else cfg.test_images
    idx = _subset(len(labels), keep, cfg.seed, 0x7E if split == "train" else 0x7F)
    return images[idx], labels[idx]


# ----------------------------------------------------------------------------- model

def _member() -> TransformerClassifier:
    return TransformerClassifier(DIM, num_classes=NUM_CLASSES, embedding=PatchEmbedding())


def member_layout() -> ParamLayout:
    """The trained entries of a member (all but the fixed ``embedding.pos_embedding``)."""
    state = _member().state_dict()
    del state[POS_KEY]
    return ParamLayout.from_state(state)


_ORDER = tuple(_member().state_dict())  # the checkpoint's key order


def member_state(layout: ParamLayout, row: Tensor, pos: Tensor) -> dict[str, Tensor]:
    """One member's full ``state_dict`` (float32, CPU) from its row ``[P]`` and the table."""
    state = layout.state_dict(row)
    state[POS_KEY] = pos.to("cpu", torch.float32).clone()
    return {k: state[k] for k in _ORDER}


class StackedPatchTransformer:
    """The forward of ``M`` MNIST members at once, each with its own patch embedding.

    ``conv1`` of model ``m`` is ``patches @ W_m^T + b_m`` with ``W_m`` its weight viewed
    ``[32, 16]``; then the fixed positional table is added and the stacked blocks and
    classifier follow (:class:`StackedTransformer`).

    Shapes: ``x`` patches ``[M, B, 49, 16]`` (per model) or ``[B, 49, 16]`` (shared)
    -> logits ``[M, B, 10]``.
    """

    def __init__(self, layout: ParamLayout, pos: Tensor) -> None:
        self.body = StackedTransformer(layout)
        self.pos = pos

    def embed(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        w = params["embedding.conv1.weight"].flatten(2)  # [M, 32, 16]
        b = params["embedding.conv1.bias"]  # [M, 32]
        m = w.shape[0]
        if x.dim() == 3:  # shared: one matmul broadcast over the models
            tokens = torch.matmul(x.reshape(1, -1, x.shape[-1]), w.transpose(1, 2))
            tokens = tokens.view(m, *x.shape[:2], -1)
        else:
            tokens = torch.einsum("mbpk,mdk->mbpd", x, w)
        return tokens + b[:, None, None, :] + self.pos

    def __call__(self, params: dict[str, Tensor], x: Tensor,
                 dropout: Dropout | None = None) -> Tensor:
        return self.body(params, self.embed(params, x), dropout)


# ----------------------------------------------------------------------------- training

def train_chunk(runs: list[dict], train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                cfg: MNISTZooConfig, chunk: int, device: torch.device,
                on_step: Callable[[float], None] | None = None) -> ChunkResult:
    """Train the runs of one chunk together; evaluate and snapshot at ``cfg.ckpt_epochs``.

    ``train`` / ``test``: ``(patches [N, 49, 16], labels [N])``. Randomness (init,
    training subsets, batch order, dropout) comes from one generator seeded by
    ``(cfg.seed, chunk)``: a chunk trains identically whenever it is redone (on the
    same device). ``on_step(models)`` reports progress and may raise to abort.
    """
    gen = torch.Generator(device=device).manual_seed(torch_seed(cfg.seed, chunk, 0x3D))
    layout = member_layout()
    model = StackedPatchTransformer(layout, sinusoidal_positions(NUM_PATCHES, DIM).to(device))
    train_x, test_x = train[0].to(device), test[0].to(device)
    test_y = test[1].to(device)

    def forward(params: dict[str, Tensor], idx: Tensor, dropout: Dropout | None) -> Tensor:
        return model(params, train_x[idx], dropout)

    def evaluate(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return evaluate_logits(lambda a, b: model(params, test_x[a:b]), test_y,
                               cfg.eval_batch_size)

    return train_stack(runs, layout, forward, evaluate, train[1], cfg, gen, device, on_step)


# ----------------------------------------------------------------------------- zoo files

def _write_metadata(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, rows, METADATA_COLUMNS)


def _data_note(cfg: MNISTZooConfig, n_train: int, n_test: int) -> str:
    return (f"scikit-learn digits (sklearn.datasets.load_digits), bilinear-upsampled to 28x28, "
            f"pixels in [0, 1]; neuralgraph_quasi.data.images.load_digits(28, split) with "
            f"split seed {DIGITS_SPLIT_SEED}: {n_train} train images"
            f"{' (seeded subset)' if cfg.train_images else ''}, {n_test} test images"
            f"{' (seeded subset)' if cfg.test_images else ''}")


def _readme(cfg: MNISTZooConfig, data: str) -> str:
    subset = ("" if cfg.test_images is None else
              "\n# the zoo uses a seeded subset of the test split: see "
              "neuralgraph_quasi.data.generate.mnist.load_images(cfg, 'test')")
    return f"""# MNIST-Transformers zoo (generated by `neuralgraph_quasi`)

Data: {data}.

{cfg.num_models} runs of `TransformerClassifier(num_classes=10, embedding=PatchEmbedding())` \
(patch embedding: 4x4 conv, stride 4, 49 tokens of width 32, fixed sinusoidal positional \
table `embedding.pos_embedding`; 2 blocks, 2 heads, no residuals), checkpoints at epochs \
{list(cfg.ckpt_epochs)}, published Small Transformer Zoo layout: \
`mnist/<run>_<epoch>_<int(acc*10000)>.pt` and `metadata/mnist.csv` (`ckpt_file` is \
relative to this directory; accuracy column `test_top1_accuracy`).

To re-evaluate one member:

```python
import torch
from neuralgraph_quasi.data.images import load_digits
from neuralgraph_quasi.models import PatchEmbedding, TransformerClassifier
images, labels = load_digits(28, "test"){subset}
model = TransformerClassifier(num_classes=10, embedding=PatchEmbedding())
model.load_state_dict(torch.load(CKPT_FILE, weights_only=True))
acc = (model(images).argmax(-1) == labels).float().mean()
```

`generator.json` holds the generator config; the same config and seed reproduce every file.
"""


def _open_zoo(root: Path, cfg: MNISTZooConfig, n_train: int, n_test: int) -> None:
    """Check or initialise ``root`` (``generator.json`` is written last)."""
    spec = root / "generator.json"
    if spec.exists():
        check_identity(root, spec, cfg.identity())
        return
    if (root / METADATA).exists():
        raise ValueError(f"{root} has metadata/mnist.csv but no generator.json: not a zoo "
                         "written by this generator; use another root")
    data = _data_note(cfg, n_train, n_test)
    atomic_write_text(root / "README.md", _readme(cfg, data))
    atomic_write_json(spec, {"generator": "neuralgraph_quasi.data.generate.mnist",
                             "data": data, "config": cfg.identity()})


def generate(cfg: MNISTZooConfig | Mapping | None = None, **overrides) -> Path:
    """Generate (or resume, or confirm) the MNIST zoo described by ``cfg``; return its root.

    ``cfg`` is an :class:`MNISTZooConfig`, a mapping of its keys (a hydra ``DictConfig``
    works) or ``None`` for the defaults; ``overrides`` replace keys.

    Runs are trained in chunks of ``models_per_chunk`` (see
    :func:`~._stacked.plan_chunks`; on CPU ``workers`` chunks at a time, each
    single-threaded). For each chunk the checkpoint files are written first (atomically),
    then ``metadata/mnist.csv`` is atomically rewritten with the chunk's rows added. On
    restart, chunks whose rows are all present are skipped; a chunk without rows is
    trained again from scratch and its stray checkpoint files replaced. A complete zoo is
    left alone; a different config (other than ``root``, ``device``, ``workers``,
    ``progress``) in an existing root raises ``ValueError`` naming the differing keys.
    """
    cfg = MNISTZooConfig.from_any(cfg, **overrides)
    root = Path(cfg.root)
    device = resolve_device(cfg.device)
    train_images, train_labels = load_images(cfg, "train")
    test_images, test_labels = load_images(cfg, "test")
    _open_zoo(root, cfg, len(train_labels), len(test_labels))
    runs = sample_runs(cfg)
    rows = read_metadata(root / METADATA)
    have = {(int(r["run"]), r["ckpt_epoch"]) for r in rows}
    chunks = plan_chunks(runs, cfg.models_per_chunk)
    todo = [c for c, chunk in enumerate(chunks)
            if not all((r["run"], str(e)) in have for r in chunk for e in cfg.ckpt_epochs)]
    if not todo:
        print(f"MNIST zoo at {root} is complete ({cfg.num_models} runs, {len(rows)} "
              "checkpoints): nothing to do")
        return root

    train = (patches(train_images), train_labels)
    test = (patches(test_images), test_labels)
    layout, pos = member_layout(), sinusoidal_positions(NUM_PATCHES, DIM)
    fixed = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
             "num_classes": NUM_CLASSES}

    def train_one(c: int, on_step: Callable[[float], None]) -> ChunkResult:
        return train_chunk(chunks[c], train, test, cfg, c, device, on_step)

    def save(c: int, result: ChunkResult) -> None:
        nonlocal rows
        new_rows = chunk_rows(chunks[c], result, fixed, SUBDIR, len(test_labels),
                              "test_top1_accuracy")
        rows = save_chunk(root, SUBDIR, rows, chunks[c], new_rows, result,
                          lambda row: member_state(layout, row, pos),
                          lambda all_rows: _write_metadata(root / METADATA, all_rows))

    run_chunks(chunks, todo, train_one, save, num_models=cfg.num_models, device=device,
               workers=cfg.workers, progress=cfg.progress, desc="MNIST zoo")
    return root
