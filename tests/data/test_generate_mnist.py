"""The MNIST-Transformers zoo generator: published layout, exact members, resume, loader."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from neuralgraph_quasi import to_model
from neuralgraph_quasi.data import SmallTransformerZoo
from neuralgraph_quasi.data.generate import mnist
from neuralgraph_quasi.data.generate.corpus import sinusoidal_positions
from neuralgraph_quasi.data.generate.mnist import (
    MNISTZooConfig,
    StackedPatchTransformer,
    generate,
    load_images,
    member_layout,
    member_state,
    patches,
)
from neuralgraph_quasi.data.images import load_digits
from neuralgraph_quasi.models import PatchEmbedding, TransformerClassifier

# 5 runs in chunks of 3 (the second chunk is partial), 2 epochs on 64 training images.
TINY = dict(num_models=5, models_per_chunk=3, epochs=2, ckpt_epochs=(1, 2), train_images=64,
            batch_size=16, progress=False, workers=1)
NAME = re.compile(r"mnist/(\d+)_(\d+)_(\d+)\.pt")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _rows(root: Path) -> list[dict]:
    with open(root / "metadata" / "mnist.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _plain_member() -> TransformerClassifier:
    return TransformerClassifier(num_classes=10, embedding=PatchEmbedding())


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return generate(root=str(tmp_path_factory.mktemp("zoo") / "mnist"), **TINY)


def test_published_layout_and_keys(zoo):
    rows = _rows(zoo)
    assert list(rows[0]) == list(mnist.METADATA_COLUMNS)
    assert [(int(r["run"]), r["ckpt_epoch"]) for r in rows] == [
        (run, e) for run in range(5) for e in ("1", "2")]
    n_test = load_digits(28, "test")[1].numel()
    for row in rows:
        run, epoch, acc = map(int, NAME.fullmatch(row["ckpt_file"]).groups())
        assert (run, str(epoch)) == (int(row["run"]), row["ckpt_epoch"])
        correct = round(float(row["test_top1_accuracy"]) * n_test)
        assert acc == correct * 10000 // n_test
        assert row["num_classes"] == "10"
    assert sorted(p.name for p in (zoo / "mnist").iterdir()) == sorted(
        Path(r["ckpt_file"]).name for r in rows)
    for name in ("generator.json", "README.md"):
        assert (zoo / name).is_file()
    spec = json.loads((zoo / "generator.json").read_text())
    assert spec["config"]["num_models"] == 5 and "digits" in spec["data"]
    assert not list(zoo.rglob("*.tmp"))


def test_checkpoints_load_strictly_and_reproduce_recorded_accuracy(zoo):
    images, labels = load_digits(28, "test")
    pos = sinusoidal_positions(49, 32)
    for row in _rows(zoo):
        state = torch.load(zoo / row["ckpt_file"], weights_only=True)
        model = _plain_member()
        assert list(state) == list(model.state_dict())
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
        assert torch.equal(state["embedding.pos_embedding"], pos)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            correct = (model(images).argmax(-1) == labels).sum().item()
        assert correct == round(float(row["test_top1_accuracy"]) * labels.numel())


def test_members_trained(zoo):
    rows = _rows(zoo)
    first = torch.load(zoo / rows[0]["ckpt_file"], weights_only=True)
    assert first["embedding.conv1.bias"].abs().sum() > 0  # biases start at 0 and moved
    accuracies = {float(r["test_top1_accuracy"]) for r in rows}
    assert len(accuracies) > 1


def test_patches_match_the_convolution():
    images = load_digits(28, "test")[0][:6]
    conv = PatchEmbedding().conv1
    expected = conv(images).flatten(2).transpose(1, 2)
    got = patches(images) @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_stacked_forward_equals_each_member():
    layout = member_layout()
    pos = sinusoidal_positions(49, 32)
    gen = torch.Generator().manual_seed(0)
    theta = 0.3 * torch.randn(3, layout.size, generator=gen)
    images = torch.rand(3, 4, 1, 28, 28, generator=gen)
    stacked = StackedPatchTransformer(layout, pos)
    per_model = stacked(layout.views(theta), patches(images.flatten(0, 1)).view(3, 4, 49, 16))
    shared = stacked(layout.views(theta), patches(images[0]))
    out64 = StackedPatchTransformer(layout, pos.double())(
        layout.views(theta.double()), patches(images[0].double()))
    for m in range(3):
        member = _plain_member()
        member.load_state_dict(member_state(layout, theta[m], pos), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(member(images[m]), per_model[m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(member(images[0]), shared[m], atol=1e-5, rtol=1e-5)
            member.double()
            torch.testing.assert_close(member(images[0].double()), out64[m], atol=1e-12,
                                       rtol=1e-12)


def test_rerun_does_nothing(zoo, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in zoo.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("a complete zoo was trained again")

    monkeypatch.setattr(mnist, "train_chunk", fail)
    assert generate(root=str(zoo), **{**TINY, "workers": 2, "progress": True}) == zoo
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in zoo.rglob("*")} == before


def test_different_config_raises_naming_keys(zoo):
    with pytest.raises(ValueError, match="differing keys: batch_size, train_images"):
        generate(root=str(zoo), **{**TINY, "train_images": 32, "batch_size": 8})


def test_interrupted_run_resumes_to_the_same_files(zoo, tmp_path, monkeypatch):
    root = tmp_path / "mnist"
    write = mnist._write_metadata
    calls = []

    def crash_on_second_chunk(path, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the chunk's checkpoints, before its rows
        write(path, rows)

    monkeypatch.setattr(mnist, "_write_metadata", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate(root=str(root), **TINY)
    assert len({r["run"] for r in _rows(root)}) == 3  # the first chunk only
    assert len(list((root / "mnist").glob("*.pt"))) == 10  # and the second's stray files
    monkeypatch.setattr(mnist, "_write_metadata", write)
    generate(root=str(root), **{**TINY, "workers": 2})
    assert _files(root) == _files(zoo)  # reproducible: the same files as in one go


def test_config_keys_and_subsets():
    with pytest.raises(ValueError, match="unknown MNIST zoo config keys: \\['epoch'\\]"):
        MNISTZooConfig.from_any({"epoch": 3})
    with pytest.raises(ValueError, match="ckpt_epochs"):
        MNISTZooConfig(epochs=2, ckpt_epochs=(1, 3))
    cfg = MNISTZooConfig(train_images=50, test_images=40)
    (x, y), (tx, ty) = load_images(cfg, "train"), load_images(cfg, "test")
    assert x.shape == (50, 1, 28, 28) and y.shape == (50,) and tx.shape[0] == ty.numel() == 40
    assert torch.equal(load_images(cfg, "train")[0], x)


def test_small_transformer_zoo_loads_the_generated_zoo(zoo):
    data = SmallTransformerZoo(str(zoo), name="mnist", split="all", log=False)
    rows = [r for r in _rows(zoo) if r["ckpt_epoch"] == "2"]  # the last epoch by default
    assert len(data) == len(rows) == 5
    for i in range(len(data)):
        graph, meta = data[i], data.meta(i)
        assert meta["ckpt_epoch"] == "2"
        state = torch.load(zoo / meta["ckpt_file"], weights_only=True)
        model = data.make_model(graph)
        assert isinstance(model.embedding, PatchEmbedding)
        rebuilt = to_model(graph, model).state_dict()
        assert list(rebuilt) == list(state)
        assert all(torch.equal(rebuilt[k], state[k]) for k in state)
        assert graph.y.item() == pytest.approx(float(meta["test_top1_accuracy"]))


def test_dataset_config_generates_and_loads(tmp_path):
    from hydra import compose, initialize_config_dir

    from neuralgraph_quasi.data import load_zoo

    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("make_zoo", overrides=[
            "dataset=mnist_tf", f"paths.data_dir={tmp_path}", "dataset.num_models=2",
            "dataset.generator.epochs=1", "dataset.generator.ckpt_epochs=[1]",
            "dataset.generator.train_images=16", "+dataset.generator.progress=false"]).dataset
    assert cfg.generator._target_ == "neuralgraph_quasi.data.generate.mnist.generate"
    data = load_zoo(cfg, "all", log=False)
    assert isinstance(data, SmallTransformerZoo) and len(data) == 2 and data.epoch == "1"
