"""Text corpora and the frozen shared embedding of the AGNews transformer zoo.

A :class:`Corpus` holds token ids and labels of a train and a test split.
It comes either from :func:`synthetic_corpus` (a seeded 4-topic generator) or
from :func:`csv_corpus` (a real AG News CSV). The members of the zoo never see
token ids: they take already-embedded sequences, ``FrozenEmbedding(tokens)``,
the sum of a frozen token table and a fixed sinusoidal position table.

Conventions (the same for both sources):

* id ``PAD_ID = 0`` is padding: every document is truncated or padded *at the
  end* to ``max_len`` tokens, and its row of the token table is zero, so a pad
  slot embeds to its position vector alone. There is no attention mask.
* id ``UNK_ID = 1`` stands for words outside the vocabulary (CSV only).
* Positions are added to every slot, pads included: ``x[t] = E[token_t] + P[t]``.

The token table must carry topic structure (as the word2vec vectors of the
published zoo do): with a random table no member learns anything. The synthetic
table places each topic's words around a per-topic centroid and the neutral
words around the origin; the CSV table is a latent semantic analysis (truncated
SVD of the TF-IDF document-term matrix of the training documents; unsupervised,
like word2vec) plus a little seeded noise.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["PAD_ID", "UNK_ID", "SPECIALS", "Corpus", "FrozenEmbedding", "synthetic_corpus",
           "synthetic_embedding", "csv_corpus", "lsa_embedding", "sinusoidal_positions",
           "sha256"]

PAD_ID = 0
UNK_ID = 1
SPECIALS = ("<pad>", "<unk>")


@dataclass(frozen=True)
class Corpus:
    """Token ids and labels of a train and a test split.

    Attributes:
        train_tokens: ``[N_train, T]`` int64, padded with :data:`PAD_ID`.
        train_labels: ``[N_train]`` int64 in ``0..num_classes-1``.
        test_tokens: ``[N_test, T]`` int64.
        test_labels: ``[N_test]`` int64.
        vocab: the word of each token id (``vocab[0] == "<pad>"``).
        num_classes: number of classes.
        topic_of_word: ``[V]`` int64, the topic of each word, ``-1`` for neutral and special
            words (synthetic corpora only; ``None`` for CSV corpora).
    """

    train_tokens: Tensor
    train_labels: Tensor
    test_tokens: Tensor
    test_labels: Tensor
    vocab: tuple[str, ...]
    num_classes: int
    topic_of_word: Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.train_tokens.shape[1]

    def state(self) -> dict:
        """Plain tensors, ints and strings: saves with ``torch.save``, loads with
        ``torch.load(..., weights_only=True)``."""
        state = {"train_tokens": self.train_tokens, "train_labels": self.train_labels,
                 "test_tokens": self.test_tokens, "test_labels": self.test_labels,
                 "vocab": list(self.vocab), "num_classes": self.num_classes, "pad_id": PAD_ID,
                 "unk_id": UNK_ID}
        if self.topic_of_word is not None:
            state["topic_of_word"] = self.topic_of_word
        return state

    @classmethod
    def from_state(cls, state: dict) -> Corpus:
        return cls(state["train_tokens"], state["train_labels"], state["test_tokens"],
                   state["test_labels"], tuple(state["vocab"]), int(state["num_classes"]),
                   state.get("topic_of_word"))


@dataclass(frozen=True)
class FrozenEmbedding:
    """The zoo's frozen input map: ``x = token[ids] + position[:T]``.

    Attributes:
        token: ``[V, d]`` float32, row :data:`PAD_ID` is zero.
        position: ``[max_len, d]`` float32, fixed sinusoidal table.

    Shapes:
        ``ids [..., T]`` int (``T <= max_len``) -> ``[..., T, d]`` float32.
    """

    token: Tensor
    position: Tensor

    def __call__(self, ids: Tensor) -> Tensor:
        return self.token[ids] + self.position[: ids.shape[-1]]

    def to(self, device: torch.device | str) -> FrozenEmbedding:
        return FrozenEmbedding(self.token.to(device), self.position.to(device))

    def state(self) -> dict:
        return {"token": self.token, "position": self.position, "pad_id": PAD_ID,
                "rule": "x[b, t] = token[ids[b, t]] + position[t]; pads (id 0) embed to "
                        "position[t]; no mask"}

    @classmethod
    def from_state(cls, state: dict) -> FrozenEmbedding:
        return cls(state["token"], state["position"])


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    r"""The fixed sinusoidal table of Vaswani et al.: ``[length, dim]`` float32.

    .. math:: P_{t,2i} = \sin(t / 10000^{2i/d}),\quad P_{t,2i+1} = \cos(t / 10000^{2i/d})
    """
    t = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(t * freq)
    table[:, 1::2] = torch.cos(t * freq)[:, : dim // 2]
    return table.float()


def _zipf(n: int, exponent: float = 1.0) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def _pad(rows: list[list[int]], max_len: int) -> Tensor:
    """Truncate or pad (with :data:`PAD_ID`, at the end) to ``[len(rows), max_len]``."""
    out = torch.full((len(rows), max_len), PAD_ID, dtype=torch.int64)
    for i, row in enumerate(rows):
        row = row[:max_len]
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    return out


def synthetic_corpus(train_docs: int, test_docs: int, seed: int, num_classes: int = 4,
                     topic_words: int = 200, neutral_words: int = 800,
                     doc_len: tuple[int, int] = (16, 32), max_len: int = 32,
                     topic_density: tuple[float, float] = (0.1, 0.4), confusion: float = 0.05,
                     label_noise: float = 0.05) -> Corpus:
    """A seeded topic corpus: each document is drawn from one of ``num_classes`` topics.

    Vocabulary: the specials, ``topic_words`` words per topic (``t{c}_{i}``) and
    ``neutral_words`` topic-neutral words (``n{i}``), each group Zipf-distributed.
    A document of topic ``c`` has a length uniform in ``doc_len`` and a topic
    density ``rho`` uniform in ``topic_density``; each token is a word of topic
    ``c`` with probability ``rho``, a word of another (random) topic with
    probability ``confusion``, and a neutral word otherwise. Its label is ``c``,
    replaced by a uniformly random *other* class with probability ``label_noise``.
    Short, sparse documents and label noise bound the reachable accuracy below 1.

    Returns:
        a :class:`Corpus` with ``topic_of_word`` set.
    """
    if not 1 <= doc_len[0] <= doc_len[1]:
        raise ValueError(f"doc_len must be (min, max) with 1 <= min <= max, got {doc_len}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0]))
    n_special, n_topic = len(SPECIALS), num_classes * topic_words
    vocab = (list(SPECIALS) + [f"t{c}_{i}" for c in range(num_classes) for i in range(topic_words)]
             + [f"n{i}" for i in range(neutral_words)])
    topic_of_word = np.full(len(vocab), -1)
    topic_of_word[n_special: n_special + n_topic] = np.repeat(np.arange(num_classes), topic_words)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        length = rng.integers(doc_len[0], doc_len[1] + 1, n)
        topic = rng.integers(0, num_classes, n)
        rho = rng.uniform(*topic_density, n)[:, None]
        u = rng.random((n, doc_len[1]))
        other = (topic[:, None] + rng.integers(1, num_classes, (n, doc_len[1]))) % num_classes
        source = np.where(u < rho, topic[:, None], np.where(u < rho + confusion, other, -1))
        word_in_topic = rng.choice(topic_words, (n, doc_len[1]), p=_zipf(topic_words))
        neutral = rng.choice(neutral_words, (n, doc_len[1]), p=_zipf(neutral_words))
        ids = np.where(source >= 0, n_special + source * topic_words + word_in_topic,
                       n_special + n_topic + neutral)
        ids[np.arange(doc_len[1])[None, :] >= length[:, None]] = PAD_ID
        flip = rng.random(n) < label_noise
        label = np.where(flip, (topic + rng.integers(1, num_classes, n)) % num_classes, topic)
        return _pad(ids.tolist(), max_len), torch.as_tensor(label, dtype=torch.int64)

    train, test = draw(train_docs), draw(test_docs)
    return Corpus(*train, *test, tuple(vocab), num_classes,
                  torch.as_tensor(topic_of_word, dtype=torch.int64))


def _unit_rms(table: np.ndarray) -> np.ndarray:
    """Scale the non-special rows to root-mean-square 1 per coordinate."""
    rms = np.sqrt(np.mean(table[len(SPECIALS):] ** 2))
    return table / max(rms, 1e-12)


def synthetic_embedding(topic_of_word: Tensor, seed: int, dim: int = 32,
                        topic_spread: float = 0.6) -> Tensor:
    """A word2vec-like table for a synthetic corpus: ``[V, dim]`` float32.

    Each topic gets a random centroid of norm ``sqrt(dim)``; its words lie at the
    centroid plus Gaussian noise of per-coordinate std ``topic_spread``; neutral words
    are Gaussian around the origin. Rows are scaled to unit RMS; the pad row is zero.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE0]))
    topics = topic_of_word.numpy()
    num_topics = int(topics.max()) + 1
    centroids = rng.standard_normal((num_topics, dim))
    centroids *= math.sqrt(dim) / np.linalg.norm(centroids, axis=1, keepdims=True)
    table = rng.standard_normal((len(topics), dim))
    is_topic = topics >= 0
    table[is_topic] = centroids[topics[is_topic]] + topic_spread * table[is_topic]
    table = _unit_rms(table)
    table[PAD_ID] = 0.0
    return torch.as_tensor(table, dtype=torch.float32)


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_agnews_csv(path: str | Path) -> tuple[list[list[str]], np.ndarray]:
    """Lowercased whitespace tokens of ``Description`` and 0-based labels of an AG News CSV.

    Accepts the Kaggle layout (header ``Class Index,Title,Description``) and the
    original headerless layout (class, title, description).
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if rows and rows[0] and rows[0][0].strip().lower() == "class index":
        header = [h.strip().lower() for h in rows[0]]
        try:
            label_col, text_col = header.index("class index"), header.index("description")
        except ValueError as err:
            raise ValueError(f"{path}: header {rows[0]} lacks 'Class Index' or "
                             "'Description'") from err
        rows = rows[1:]
    else:
        label_col, text_col = 0, 2
    docs = [row[text_col].lower().split() for row in rows if row]
    labels = np.array([int(row[label_col]) - 1 for row in rows if row], dtype=np.int64)
    if labels.size == 0 or labels.min() < 0:
        raise ValueError(f"{path}: no rows, or class indices not starting at 1")
    return docs, labels


def _subset(n: int, keep: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``keep`` of ``n`` items (all if None)."""
    if keep is None or keep >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, keep, replace=False))


def csv_corpus(path: str | Path, seed: int, test_path: str | Path | None = None,
               train_docs: int | None = None, test_docs: int | None = None,
               test_fraction: float = 0.2, max_len: int = 32, min_count: int = 2,
               max_vocab: int = 20000) -> Corpus:
    """A corpus from an AG News CSV (whitespace tokens of ``Description``, lowercased).

    The test split is ``test_path`` if given, else a seeded ``test_fraction`` of
    ``path``. ``train_docs`` / ``test_docs`` keep a seeded random subset of each
    split (``None``: all). The vocabulary holds the training words seen at least
    ``min_count`` times (at most ``max_vocab``, most frequent first, ties
    alphabetical); other words map to :data:`UNK_ID`. Labels ``1..C`` become ``0..C-1``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC5]))
    docs, labels = _read_agnews_csv(path)
    if test_path is not None:
        test_docs_all, test_labels = _read_agnews_csv(test_path)
        train_idx = np.arange(len(docs))
    else:
        order = rng.permutation(len(docs))
        n_test = max(1, round(test_fraction * len(docs)))
        train_idx, test_idx = np.sort(order[n_test:]), np.sort(order[:n_test])
        test_docs_all, test_labels = [docs[i] for i in test_idx], labels[test_idx]
    train_idx = train_idx[_subset(len(train_idx), train_docs, rng)]
    keep_test = _subset(len(test_docs_all), test_docs, rng)
    train = [docs[i] for i in train_idx]
    test = [test_docs_all[i] for i in keep_test]
    num_classes = int(max(labels.max(), test_labels.max())) + 1

    counts: dict[str, int] = {}
    for doc in train:
        for word in doc:
            counts[word] = counts.get(word, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = list(SPECIALS) + words[:max_vocab]
    index = {w: i for i, w in enumerate(vocab)}

    def encode(split: list[list[str]]) -> Tensor:
        return _pad([[index.get(w, UNK_ID) for w in doc] for doc in split], max_len)

    return Corpus(encode(train), torch.as_tensor(labels[train_idx]), encode(test),
                  torch.as_tensor(test_labels[keep_test]), tuple(vocab), num_classes)


def lsa_embedding(train_tokens: Tensor, vocab_size: int, seed: int, dim: int = 32,
                  noise: float = 0.1) -> Tensor:
    """A latent-semantic-analysis table from the training documents: ``[V, dim]`` float32.

    Truncated SVD of the TF-IDF document-term matrix (``log1p`` counts, smoothed IDF,
    documents L2-normalised); a word's vector is its right singular vector loadings
    times the singular values, with a deterministic sign per component. Components
    beyond the matrix rank are zero. Rows are scaled to unit RMS, then Gaussian
    noise of std ``noise`` is added (seeded); the pad row is zero.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    ids = train_tokens.numpy()
    doc = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    word = ids.reshape(-1)
    keep = word >= len(SPECIALS)
    counts = sp.coo_matrix((np.ones(keep.sum()), (doc[keep], word[keep])),
                           shape=(ids.shape[0], vocab_size)).tocsr()
    counts.sum_duplicates()
    df = np.bincount(counts.indices, minlength=vocab_size)
    idf = np.log((1 + ids.shape[0]) / (1 + df)) + 1.0
    tfidf = counts.copy()
    tfidf.data = np.log1p(tfidf.data)
    tfidf = tfidf @ sp.diags(idf)
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(1))).ravel()
    tfidf = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ tfidf

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE5]))
    k = min(dim, min(tfidf.shape) - 1)
    if k < 1:
        loadings = np.zeros((vocab_size, 0))
    elif min(tfidf.shape) <= 4 * dim:  # small: exact dense SVD
        _, s, vt = np.linalg.svd(tfidf.toarray(), full_matrices=False)
        loadings = vt[:k].T * s[:k]
    else:
        _, s, vt = svds(tfidf, k=k, v0=rng.standard_normal(min(tfidf.shape)))
        order = np.argsort(-s)
        loadings = vt[order].T * s[order]
    signs = np.sign(loadings[np.abs(loadings).argmax(0), np.arange(loadings.shape[1])])
    table = np.zeros((vocab_size, dim))
    table[:, : loadings.shape[1]] = loadings * np.where(signs == 0, 1.0, signs)
    table = _unit_rms(table) + noise * rng.standard_normal((vocab_size, dim))
    table[PAD_ID] = 0.0
    return torch.as_tensor(table, dtype=torch.float32)
