"""The AGNews zoo generator: published layout, exact members, resume, reproducibility."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from neuralgraph_quasi.data._atomic import atomic_open, atomic_save_numpy, atomic_write_text
from neuralgraph_quasi.data.generate import agnews
from neuralgraph_quasi.data.generate.agnews import (
    AGNewsZooConfig,
    Dropout,
    ParamLayout,
    StackedOptimizer,
    StackedTransformer,
    generate,
    lr_schedule,
)
from neuralgraph_quasi.data.generate.corpus import csv_corpus, sha256, synthetic_corpus
from neuralgraph_quasi.models import TransformerClassifier

# 6 runs in chunks of 4 (the second chunk is partial), 2 epochs on a tiny corpus.
TINY = dict(num_models=6, models_per_chunk=4, epochs=2, ckpt_epochs=(1, 2), train_docs=96,
            test_docs=48, batch_size=16, topic_words=20, neutral_words=40, progress=False,
            workers=1)
NAME = re.compile(r"ag_news/(\d+)_(\d+)_(\d+)\.pt")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _rows(root: Path) -> list[dict]:
    with open(root / "metadata" / "ag_news.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _member_accuracy(root: Path, row: dict) -> tuple[float, TransformerClassifier]:
    """Load a checkpoint strictly and evaluate it with plain torch on the stored test split."""
    corpus = torch.load(root / "corpus.pt", weights_only=True)
    emb = torch.load(root / "embedding.pt", weights_only=True)
    ids = corpus["test_tokens"]
    x = emb["token"][ids] + emb["position"][: ids.shape[1]]
    state = torch.load(root / row["ckpt_file"], weights_only=True)
    model = TransformerClassifier(num_classes=int(row["num_classes"]))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        correct = (model(x).argmax(-1) == corpus["test_labels"]).sum().item()
    return correct / ids.shape[0], model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and robust on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return generate(root=str(tmp_path_factory.mktemp("zoo") / "agnews"), **TINY)


def test_published_layout_and_names(zoo):
    rows = _rows(zoo)
    assert list(rows[0]) == list(agnews.METADATA_COLUMNS)
    assert {"optimizer", "lr", "w_init_std", "l2_regularize", "train_fraction", "dropout",
            "epochs", "seed", "ckpt_epoch", "ckpt_file", "test_accuracy"} <= set(rows[0])
    assert [(int(r["run"]), r["ckpt_epoch"]) for r in rows] == [
        (run, e) for run in range(6) for e in ("1", "2")]
    n_test = torch.load(zoo / "corpus.pt", weights_only=True)["test_labels"].numel()
    for row in rows:
        run, epoch, acc = map(int, NAME.fullmatch(row["ckpt_file"]).groups())
        assert (run, str(epoch)) == (int(row["run"]), row["ckpt_epoch"])
        correct = round(float(row["test_accuracy"]) * n_test)
        assert acc == correct * 10000 // n_test == int(float(row["test_accuracy"]) * 10000 + 1e-9)
        assert row["optimizer"] in agnews.OPTIMIZERS
    assert sorted(p.name for p in (zoo / "ag_news").iterdir()) == sorted(
        Path(r["ckpt_file"]).name for r in rows)
    for name in ("embedding.pt", "corpus.pt", "generator.json", "README.md"):
        assert (zoo / name).is_file()
    assert "synthetic" in (zoo / "README.md").read_text()
    assert json.loads((zoo / "generator.json").read_text())["config"]["num_models"] == 6
    assert not list(zoo.rglob("*.tmp"))


def test_checkpoints_load_strictly_and_reproduce_recorded_accuracy(zoo):
    expected = set(TransformerClassifier(num_classes=4).state_dict())
    for row in _rows(zoo):
        state = torch.load(zoo / row["ckpt_file"], weights_only=True)
        assert set(state) == expected
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
        accuracy, _ = _member_accuracy(zoo, row)
        assert accuracy == pytest.approx(float(row["test_accuracy"]), abs=1e-6)


def test_members_trained(zoo):
    rows = [r for r in _rows(zoo) if r["ckpt_epoch"] == "2"]
    assert max(float(r["test_accuracy"]) for r in rows) > 0.4  # chance is 0.25
    first = torch.load(zoo / _rows(zoo)[0]["ckpt_file"], weights_only=True)
    assert first["encoder.0.fc1.bias"].abs().sum() > 0  # biases start at 0 and moved


@pytest.mark.parametrize("num_classes", [4, 10])
def test_stacked_forward_equals_each_member(num_classes):
    layout = ParamLayout.for_classes(num_classes)
    gen = torch.Generator().manual_seed(0)
    theta = 0.3 * torch.randn(3, layout.size, generator=gen)
    x = torch.randn(3, 5, 7, 32, generator=gen)
    stacked = StackedTransformer(layout)
    out64 = stacked(layout.views(theta.double()), x.double())
    out32, shared = stacked(layout.views(theta), x), stacked(layout.views(theta), x[0])
    for m in range(3):
        member = TransformerClassifier(num_classes=num_classes)
        member.load_state_dict(layout.state_dict(theta[m]), strict=True)
        assert list(layout.state_dict(theta[m])) == list(member.state_dict())
        torch.testing.assert_close(member.double()(x[m].double()), out64[m], atol=1e-12,
                                   rtol=1e-12)
        member.float()
        torch.testing.assert_close(member(x[m]), out32[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(member(x[0]), shared[m], atol=1e-5, rtol=1e-5)


def _torch_optimizer(name: str, params, lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd,
                           momentum=0.9 if name == "sgd_momentum" else 0.0)


def test_stacked_optimizer_matches_torch_optim():
    names = list(agnews.OPTIMIZERS)
    m, p, steps = len(names), 7, 5
    gen = torch.Generator().manual_seed(1)
    lr = torch.tensor([1e-2, 3e-3, 0.1, 0.05], dtype=torch.float64)
    wd = torch.tensor([1e-3, 0.0, 1e-2, 1e-4])
    theta = torch.randn(m, p, generator=gen, dtype=torch.float64)
    grads = torch.randn(steps, m, p, generator=gen, dtype=torch.float64)
    active = torch.ones(steps, m, dtype=torch.bool)
    active[2, 1] = False  # rmsprop sits out step 2
    refs = [theta[i].clone().requires_grad_() for i in range(m)]
    opts = [_torch_optimizer(n, [r], float(lr[i]), float(wd[i])) for i, (n, r) in
            enumerate(zip(names, refs, strict=True))]
    stacked = StackedOptimizer(names, lr, wd, p, dtype=torch.float64)
    for s in range(steps):
        stacked.step(theta, grads[s], torch.ones(m, dtype=torch.float64), active[s])
        for i in range(m):
            if active[s, i]:
                refs[i].grad = grads[s, i].clone()
                opts[i].step()
    torch.testing.assert_close(theta, torch.stack([r.detach() for r in refs]), atol=1e-12,
                               rtol=1e-12)
    assert stacked.step_count.tolist() == [5, 4, 5, 5]


def test_lr_schedule_warmup_then_cosine():
    total = torch.full((21,), 20)
    scale = lr_schedule(torch.arange(21), total, warmup_fraction=0.1)
    assert scale[0] == pytest.approx(0.5) and scale[1] == pytest.approx(1.0)
    assert torch.all(scale[2:].diff() <= 0) and scale[20] == pytest.approx(0.0, abs=1e-12)


def test_dropout_rates_and_expectation():
    gen = torch.Generator().manual_seed(0)
    drop = Dropout.from_rates(torch.tensor([0.0, 0.2]), gen)
    out = drop(torch.ones(2, 200, 100))
    assert torch.equal(out[0], torch.ones(200, 100))
    assert (out[1] == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert out[1].mean().item() == pytest.approx(1.0, abs=0.03)


def test_synthetic_embedding_carries_topics(zoo):
    corpus = torch.load(zoo / "corpus.pt", weights_only=True)
    emb = torch.load(zoo / "embedding.pt", weights_only=True)
    assert torch.all(emb["token"][0] == 0)  # pad row
    pooled = {s: emb["token"][corpus[f"{s}_tokens"]].mean(1) for s in ("train", "test")}
    means = torch.stack([pooled["train"][corpus["train_labels"] == c].mean(0) for c in range(4)])
    predicted = torch.cdist(pooled["test"], means).argmin(1)
    assert (predicted == corpus["test_labels"]).float().mean() > 0.6


def test_rerun_does_nothing(zoo, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in zoo.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("a complete zoo was trained again")

    monkeypatch.setattr(agnews, "train_chunk", fail)
    assert generate(root=str(zoo), **{**TINY, "workers": 2, "progress": True}) == zoo
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in zoo.rglob("*")} == before


def test_different_config_raises_naming_keys(zoo):
    with pytest.raises(ValueError, match="differing keys: ckpt_epochs, epochs"):
        generate(root=str(zoo), **{**TINY, "epochs": 3, "ckpt_epochs": (1, 3)})


def test_interrupted_run_resumes_to_the_same_files(zoo, tmp_path, monkeypatch):
    root = tmp_path / "agnews"
    write = agnews._write_metadata
    calls = []

    def crash_on_second_chunk(path, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the chunk's checkpoints, before its rows
        write(path, rows)

    monkeypatch.setattr(agnews, "_write_metadata", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate(root=str(root), **TINY)
    first, second = (sorted(r["run"] for r in chunk) for chunk in
                     agnews.plan_chunks(agnews.sample_runs(AGNewsZooConfig(**TINY)), 4))
    assert sorted({int(r["run"]) for r in _rows(root)}) == first
    for run in second:  # stray files of the second chunk, without metadata rows
        assert len(list((root / "ag_news").glob(f"{run}_*.pt"))) == 2
    # make one stale, as if written with another accuracy: the rerun must remove it
    stale = next((root / "ag_news").glob(f"{second[0]}_1_*.pt"))
    stale.rename(stale.with_name(f"{second[0]}_1_0.pt"))
    monkeypatch.setattr(agnews, "_write_metadata", write)
    generate(root=str(root), **{**TINY, "workers": 2})
    assert _files(root) == _files(zoo)


def test_chunks_group_equal_train_fractions():
    runs = agnews.sample_runs(AGNewsZooConfig(num_models=40))
    chunks = agnews.plan_chunks(runs, 8)
    assert sorted(r["run"] for c in chunks for r in c) == list(range(40))
    mixed = sum(len({r["train_fraction"] for r in c}) > 1 for c in chunks)
    assert mixed <= len(AGNewsZooConfig().train_fraction) - 1


def test_same_config_and_seed_reproduce_every_file(zoo, tmp_path):
    root = generate(root=str(tmp_path / "again"), **{**TINY, "workers": 2})
    assert _files(root) == _files(zoo)
    other = generate(root=str(tmp_path / "seed1"), **{**TINY, "num_models": 2, "seed": 1})
    assert _files(other)["corpus.pt"] != _files(zoo)["corpus.pt"]


def test_config_from_mapping_and_unknown_keys():
    from omegaconf import OmegaConf

    cfg = AGNewsZooConfig.from_any(OmegaConf.create({"ckpt_epochs": [1, 2], "epochs": 2,
                                                     "lr_range": {"adam": [1e-3, 1e-2]},
                                                     "optimizers": ["adam"]}))
    assert cfg.ckpt_epochs == (1, 2) and cfg.lr_range == {"adam": (1e-3, 1e-2)}
    with pytest.raises(ValueError, match="unknown AGNews zoo config keys: \\['epoch'\\]"):
        AGNewsZooConfig.from_any({"epoch": 3})
    with pytest.raises(ValueError, match="ckpt_epochs"):
        AGNewsZooConfig(epochs=2, ckpt_epochs=(1, 3))


WORDS = {1: "election minister parliament treaty", 2: "goal match coach league",
         3: "shares profit market bank", 4: "software chip internet space"}


def _write_csv(path: Path, n: int = 64, header: bool = True) -> Path:
    lines = ["Class Index,Title,Description"] if header else []
    for i in range(n):
        label = 1 + i % 4
        topic, common = WORDS[label].split(), ["The", "a", "of", "Reuters", "said"]
        words = [topic[(i + k) % 4] if k % 2 else common[(i + k) % 5] for k in range(12)]
        lines.append(f'{label},"title {i}","{" ".join(words)} {i}"')
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def test_csv_corpus_reads_both_layouts(tmp_path):
    a = csv_corpus(_write_csv(tmp_path / "a.csv"), seed=0, max_len=8, min_count=1)
    b = csv_corpus(_write_csv(tmp_path / "b.csv", header=False), seed=0, max_len=8, min_count=1)
    assert torch.equal(a.train_tokens, b.train_tokens) and a.vocab == b.vocab
    assert a.num_classes == 4 and set(a.train_labels.tolist()) == {0, 1, 2, 3}
    assert "the" in a.vocab and "The" not in a.vocab  # lowercased
    assert a.train_tokens.shape == (51, 8) and a.test_tokens.shape == (13, 8)


def test_user_csv_zoo(tmp_path):
    path = _write_csv(tmp_path / "train.csv")
    root = generate(root=str(tmp_path / "csvzoo"), csv=str(path), train_docs=None,
                    test_docs=None, max_len=12, min_count=1, **{
                        k: v for k, v in TINY.items() if k not in ("train_docs", "test_docs")})
    readme = (root / "README.md").read_text()
    assert "user AG News CSV" in readme and str(path) in readme
    assert sha256(path) in readme
    rows = _rows(root)
    assert len(rows) == 12
    for row in rows[:4]:
        accuracy, _ = _member_accuracy(root, row)
        assert accuracy == pytest.approx(float(row["test_accuracy"]), abs=1e-6)
    emb = torch.load(root / "embedding.pt", weights_only=True)["token"]
    assert emb.shape[1] == 32 and torch.all(emb[0] == 0)


def test_synthetic_corpus_topics_and_label_noise():
    kwargs = dict(topic_words=10, neutral_words=20, doc_len=(4, 6), max_len=8, confusion=0.0)
    clean = synthetic_corpus(400, 100, seed=3, label_noise=0.0, **kwargs)
    noisy = synthetic_corpus(400, 100, seed=3, label_noise=0.3, **kwargs)
    lengths = (clean.train_tokens != 0).sum(1)
    assert clean.train_tokens.shape == (400, 8) and lengths.min() >= 4 and lengths.max() <= 6
    topic = clean.topic_of_word[clean.train_tokens]  # -1 for neutral words and pads
    assert torch.all((topic == -1) | (topic == clean.train_labels[:, None]))
    assert torch.equal(clean.train_tokens, noisy.train_tokens)
    flipped = (clean.train_labels != noisy.train_labels).float().mean().item()
    assert flipped == pytest.approx(0.3, abs=0.07)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    import numpy as np

    path = tmp_path / "a" / "file.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as handle:
        handle.write("partial")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and [p.name for p in path.parent.iterdir()] == ["file.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_save_numpy(tmp_path / "x.bin", np.arange(3))
    assert np.load(tmp_path / "x.bin").tolist() == [0, 1, 2]


def test_dtype_is_part_of_the_identity_only_when_not_the_default(zoo):
    spec = json.loads((zoo / "generator.json").read_text())
    assert "dtype" not in spec["config"] and "algorithm" not in spec["config"]  # as before
    assert AGNewsZooConfig.from_any(spec["config"]).identity() == spec["config"]
    assert AGNewsZooConfig(dtype="bfloat16").identity()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="differing keys: dtype"):
        generate(root=str(zoo), **{**TINY, "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="generator dtype must be one of"):
        AGNewsZooConfig(dtype="half")


def test_a_bfloat16_zoo_trains(tmp_path):
    root = generate(root=str(tmp_path / "bf16"), **{**TINY, "num_models": 2, "dtype": "bfloat16"})
    rows = _rows(root)
    assert len(rows) == 2 * len(TINY["ckpt_epochs"])
    assert all(float(r["test_loss"]) < float("inf") for r in rows)
    state = torch.load(root / rows[-1]["ckpt_file"], weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values())
