"""Generate an AGNews-architecture transformer zoo in the published Small Transformer Zoo layout.

:func:`generate` trains ``num_models`` runs of
:class:`~neuralgraph_quasi.models.TransformerClassifier` (``embedding=None``) on
a frozen, shared embedding of a text corpus (synthetic, or the user's AG News
CSV), *many models at once*: the parameters of a chunk of ``models_per_chunk``
runs live in one ``[M, P]`` tensor, the forward is batched matmuls over the
model axis (:class:`StackedTransformer`), and the four optimizers are one
vectorised update rule with per-model coefficients (:class:`StackedOptimizer`);
these shared pieces live in :mod:`._stacked` (re-exported here).

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._atomic import atomic_torch_save, atomic_write_csv, atomic_write_json, atomic_write_text
from ._stacked import (
    DIM,
    DROPOUT_GRID,
    L2_GRID,
    OPTIMIZERS,
    TRAIN_FRACTION_GRID,
    ChunkResult,
    Dropout,
    ParamLayout,
    StackedOptimizer,
    StackedTransformer,
    ZooConfigBase,
    check_dtype,
    check_identity,
    check_sweep,
    chunk_rows,
    evaluate_logits,
    lr_schedule,
    plan_chunks,
    read_metadata,
    resolve_device,
    run_chunks,
    sample_runs,
    save_chunk,
    torch_seed,
    train_stack,
)
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

METADATA_COLUMNS = ("run", "optimizer", "lr", "w_init_std", "l2_regularize", "train_fraction",
                    "dropout", "epochs", "batch_size", "seed", "num_classes", "ckpt_epoch",
                    "ckpt_file", "test_accuracy", "test_loss", "train_loss")
METADATA = Path("metadata") / "ag_news.csv"
SUBDIR = "ag_news"

# ----------------------------------------------------------------------------- config

@dataclass
class AGNewsZooConfig(ZooConfigBase):
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

    Precision: ``dtype`` ``"float32"`` (default) or ``"bfloat16"`` (opt-in: matrix
    products under ``torch.autocast``; parameters, optimizer and checkpoints float32; no
    faster on the 2-core EPYC at these matrix sizes, and the zoo then depends on the
    CPU's kernels). Part of the zoo's identity.

    Execution: ``models_per_chunk`` runs trained at once (bounds memory; part of the
    zoo's identity since it sets the random streams; raise it on a GPU, e.g. 1024),
    ``eval_batch_size`` test documents per forward, ``device`` (``"auto"``: CUDA when
    available), ``workers`` (CPU only: chunks trained concurrently in threads, each with
    one intra-op thread; ``None``: ``torch.get_num_threads()``; the files do not depend
    on it), ``progress`` (tqdm bar). The runtime keys ``root``, ``device``, ``workers``
    and ``progress`` may change between runs of one zoo; every other key must match
    ``root/generator.json``.
    """

    root: str = "data/agnews_tf"
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
    l2_regularize: tuple[float, ...] = L2_GRID
    train_fraction: tuple[float, ...] = TRAIN_FRACTION_GRID
    dropout: tuple[float, ...] = DROPOUT_GRID
    # execution
    models_per_chunk: int = 64
    eval_batch_size: int = 50
    dtype: str = "float32"
    device: str = "auto"
    workers: int | None = None
    progress: bool = True

    _label = "AGNews"  # class attributes (no annotation): not config keys

    def __post_init__(self) -> None:
        check_sweep(self)
        check_dtype(self.dtype)


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate_stack(model: StackedTransformer, params: dict[str, Tensor], embed: FrozenEmbedding,
                   tokens: Tensor, labels: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Correct counts ``[M]`` int64 and mean cross-entropy ``[M]`` on ``(tokens, labels)``.

    Shapes: tokens ``[N, T]``, labels ``[N]``, both on the parameters' device.
    """
    return evaluate_logits(lambda a, b: model(params, embed(tokens[a:b])), labels, batch_size)


def train_chunk(runs: list[dict], corpus: Corpus, embed: FrozenEmbedding, cfg: AGNewsZooConfig,
                chunk: int, num_classes: int, device: torch.device,
                on_step: Callable[[float], None] | None = None) -> ChunkResult:
    """Train the runs of one chunk together; evaluate and snapshot at ``cfg.ckpt_epochs``.

    Randomness (init, training subsets, batch order, dropout) comes from one generator
    seeded by ``(cfg.seed, chunk)``: a chunk trains identically whenever it is redone
    (on the same device). Runs with fewer steps than others in an epoch sit out the
    remaining steps (see :class:`~._stacked.Batches`; :func:`plan_chunks` makes this rare).
    ``on_step(models)`` is called after every step with the progress made, in models;
    it may raise to abort.
    """
    gen = torch.Generator(device=device).manual_seed(torch_seed(cfg.seed, chunk, 0x7A))
    layout = ParamLayout.for_classes(num_classes)
    model = StackedTransformer(layout)
    train_x = corpus.train_tokens.to(device)
    test_x, test_y = corpus.test_tokens.to(device), corpus.test_labels.to(device)

    def forward(params: dict[str, Tensor], idx: Tensor, dropout: Dropout | None) -> Tensor:
        return model(params, embed(train_x[idx]), dropout)

    def evaluate(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return evaluate_stack(model, params, embed, test_x, test_y, cfg.eval_batch_size)

    return train_stack(runs, layout, forward, evaluate, corpus.train_labels, cfg, gen, device,
                       on_step)


# ----------------------------------------------------------------------------- zoo files

def _read_metadata(path: Path) -> list[dict]:
    return read_metadata(path)


def _write_metadata(path: Path, rows: list[dict]) -> None:
    """Atomically replace the metadata CSV by ``rows`` (old rows plus a chunk's new ones)."""
    atomic_write_csv(path, rows, METADATA_COLUMNS)


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
        check_identity(root, spec, cfg.identity())
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


def _save_chunk(root: Path, rows: list[dict], chunk: list[dict], result: ChunkResult,
                cfg: AGNewsZooConfig, layout: ParamLayout, n_test: int) -> list[dict]:
    """Write a chunk's checkpoints, then the metadata with its rows; return all rows."""
    num_classes = layout.shapes[layout.names.index("classifier.fc2.weight")][0]
    fixed = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
             "num_classes": num_classes}
    new_rows = chunk_rows(chunk, result, fixed, SUBDIR, n_test, "test_accuracy")
    return save_chunk(root, SUBDIR, rows, chunk, new_rows, result, layout.state_dict,
                      lambda all_rows: _write_metadata(root / METADATA, all_rows))


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
    device = resolve_device(cfg.device)
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

    n_test = corpus.test_labels.numel()

    def train(c: int, on_step: Callable[[float], None]) -> ChunkResult:
        return train_chunk(chunks[c], corpus, embed, cfg, c, num_classes, device, on_step)

    def save(c: int, result: ChunkResult) -> None:
        nonlocal rows
        rows = _save_chunk(root, rows, chunks[c], result, cfg, layout, n_test)

    run_chunks(chunks, todo, train, save, num_models=cfg.num_models, device=device,
               workers=cfg.workers, progress=cfg.progress, desc="AGNews zoo")
    return root
