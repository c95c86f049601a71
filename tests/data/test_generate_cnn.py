"""The CNN zoo generator writes the published Small CNN Zoo format, resumably and reproducibly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from neuralgraph_quasi import to_model
from neuralgraph_quasi.data.cnn_zoo import SmallCNNZoo, small_cnn
from neuralgraph_quasi.data.generate import cnn
from neuralgraph_quasi.data.images import load_digits

COLUMNS = ["config.activation", "config.b_init", "config.dataset", "config.dropout",
           "config.init_std", "config.l2reg", "config.learning_rate", "config.optimizer",
           "config.train_fraction", "config.w_init", "modeldir", "step", "test_accuracy",
           "test_loss", "train_accuracy", "train_loss"]
#: A tiny, fast zoo: 16×16 digits (7×7, 3×3, 1×1 feature maps), two chunks of three runs.
TINY = dict(num_models=6, models_per_chunk=3, steps=(0, 1, 2), image_size=16, batch_size=32,
            progress=False, threads=1, device="cpu")
FILES = ("weights.npy", "metrics.csv", "layout.csv", "generator.json")


def tiny(root, **overrides):
    return cnn.generate({**TINY, "root": str(root), **overrides})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(root) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in FILES}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("cnn_zoo"))


def test_generated_files_follow_the_published_format(zoo):
    runs, steps = TINY["num_models"], TINY["steps"]
    weights = np.load(zoo / "weights.npy")
    assert weights.dtype == np.float32 and weights.shape == (runs * len(steps), 4970)
    assert np.isfinite(weights).all()
    with open(zoo / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = read_csv(zoo / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(steps) * runs
    assert {r["config.activation"] for r in rows} <= {"relu", "tanh"}
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    layout = read_csv(zoo / "layout.csv")
    start = {r["varname"]: int(r["start_idx"]) for r in layout}
    assert start["sequential/conv2d/bias:0"] < start["sequential/conv2d/kernel:0"]  # as TF
    assert {r["varname"]: r["shape"] for r in layout}["sequential/conv2d_1/kernel:0"] == \
        "(3, 3, 16, 16)"
    spec = json.loads((zoo / "generator.json").read_text())
    assert spec["config"]["steps"] == list(steps) and "root" not in spec["config"]
    assert not (zoo / "shards").exists()


def test_loader_reads_the_zoo_and_accuracies_match_reevaluation(zoo):
    data = SmallCNNZoo(zoo, split="all", activation=None, log=False)
    assert data.step == max(TINY["steps"]) and len(data) == TINY["num_models"]
    images, labels = load_digits(TINY["image_size"], "test")
    for i in range(len(data)):
        graph, meta = data[i], data.meta(i)
        model = to_model(graph, data.make_model(graph))
        assert type(model[1]).__name__.lower() == meta["config.activation"]
        with torch.no_grad():
            accuracy = (model(images).argmax(1) == labels).double().mean().item()
        # the generator evaluates with grouped convolutions: float rounding may flip an image
        assert accuracy == pytest.approx(float(meta["test_accuracy"]), abs=1.01 / len(labels))


def test_an_interrupted_run_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                      zoo):
    trained = []
    real = cnn.train_chunk

    def failing(runs, *args, **kwargs):
        if trained:
            raise KeyboardInterrupt("simulated interruption")
        trained.append([r["run"] for r in runs])
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(cnn, "train_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        tiny(tmp_path)
    assert (tmp_path / "shards" / "chunk_00000.npz").exists()
    assert not (tmp_path / "weights.npy").exists() and not (tmp_path / "metrics.csv").exists()

    def counting(runs, *args, **kwargs):
        trained.append([r["run"] for r in runs])
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(cnn, "train_chunk", counting)
    tiny(tmp_path)
    first, resumed = trained[0], [run for chunk in trained[1:] for run in chunk]
    assert not set(first) & set(resumed)  # the saved chunk was not trained again
    assert sorted(first + resumed) == list(range(TINY["num_models"]))
    assert snapshot(tmp_path) == snapshot(zoo)  # same seed: identical files


def test_rerunning_a_complete_zoo_does_nothing(zoo, monkeypatch):
    before = {name: (zoo / name).stat().st_mtime_ns for name in FILES}
    monkeypatch.setattr(cnn, "train_chunk", lambda *a, **k: pytest.fail("trained again"))
    assert tiny(zoo, progress=True, threads=None) == zoo  # runtime keys may change
    assert {name: (zoo / name).stat().st_mtime_ns for name in FILES} == before


def test_a_different_config_in_the_same_root_names_the_keys(zoo):
    with pytest.raises(ValueError, match=r"differing keys: num_models, seed\b"):
        tiny(zoo, seed=1, num_models=7)


def test_another_seed_gives_another_zoo(tmp_path, zoo):
    tiny(tmp_path, num_models=2, seed=1)
    other = np.load(tmp_path / "weights.npy")
    assert other.shape[0] == 6 and not np.array_equal(other, np.load(zoo / "weights.npy")[:6])


def test_stacked_forward_equals_each_small_cnn():
    torch.manual_seed(0)
    runs = [{"activation": a} for a in ("relu", "tanh", "relu")]
    models = [small_cnn(r["activation"]) for r in runs]
    params = {k: torch.stack([m.state_dict()[k] for m in models]) for k in models[0].state_dict()}
    stacked = cnn.StackedCNN(torch.tensor([r["activation"] == "relu" for r in runs]))
    x = torch.rand(5, 1, 28, 28)
    own = torch.rand(5, 3, 1, 28, 28)  # a batch per model
    with torch.no_grad():
        shared, separate = stacked(params, x), stacked(params, own)
        for i, model in enumerate(models):
            torch.testing.assert_close(shared[:, i], model(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(separate[:, i], model(own[:, i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [None, [0, 2]])
def test_a_training_step_gives_each_model_its_own_gradient(rows):
    torch.manual_seed(0)
    models = [small_cnn(a) for a in ("relu", "tanh", "relu")]
    params = {k: torch.stack([m.state_dict()[k] for m in models]).requires_grad_()
              for k in models[0].state_dict()}
    stacked = cnn.StackedCNN(torch.tensor([True, False, True]))
    data = {"train_x": torch.rand(10, 1, 16, 16), "train_y": torch.randint(0, 10, (10,))}
    chosen = [0, 1, 2] if rows is None else rows
    idx = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 9], [8, 6, 0, 1]])[chosen]
    valid = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])[chosen]
    l2 = torch.tensor([1e-2, 1e-3, 3e-3])[chosen]
    grads = cnn._train_step(stacked, params, data, idx, valid,
                            None if rows is None else torch.tensor(rows), l2, None, None)
    for i, model in enumerate(models):
        if i not in chosen:
            assert all(not g[i].any() for g in grads)  # left out: no gradient
            continue
        j = chosen.index(i)
        own = idx[j][valid[j].bool()]
        loss = torch.nn.functional.cross_entropy(model(data["train_x"][own]),
                                                 data["train_y"][own])
        loss = loss + l2[j] * sum(p.square().sum() for name, p in model.named_parameters()
                                  if name.endswith("weight"))
        expected = torch.autograd.grad(loss, list(model.parameters()))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)


def test_runs_are_seeded_per_run_and_chunks_hold_one_activation():
    small = cnn.sample_runs(cnn.CNNZooConfig(num_models=5))
    large = cnn.sample_runs(cnn.CNNZooConfig(num_models=50))
    assert small == large[:5]  # run r does not depend on num_models
    chunks = cnn.chunk_plan(large, 16)
    keys = [(r["activation"], r["train_fraction"]) for chunk in chunks for r in chunk]
    assert keys == sorted(keys) and sorted(r["run"] for c in chunks for r in c) == list(range(50))
    assert all(len({r["activation"] for r in c}) == 1 and len(c) <= 16 for c in chunks)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown CNN zoo config keys: \['epochz'\]"):
        cnn.CNNZooConfig.from_any({"epochz": 3})
    with pytest.raises(ValueError, match="optimizers"):
        cnn.CNNZooConfig(optimizers=("adagrad",))
    for steps in ((1, 1), (2, 0)):
        with pytest.raises(ValueError, match="steps must be increasing"):
            cnn.CNNZooConfig(steps=steps)
    with pytest.raises(ValueError, match="image_size must be >= 15"):
        cnn.CNNZooConfig(image_size=14)


def test_worker_threads_do_not_change_the_files(tmp_path, zoo):
    # chunks train single-threaded, two at a time here: the same bytes as one at a time
    tiny(tmp_path, threads=2, workers=2)
    assert snapshot(tmp_path) == snapshot(zoo)


def test_an_interrupted_threaded_run_resumes_to_the_same_files(tmp_path, monkeypatch, zoo):
    real, calls = cnn._save_shard, []

    def crash_on_second_shard(path, result):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real(path, result)

    monkeypatch.setattr(cnn, "_save_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        tiny(tmp_path, workers=2)
    assert len(list((tmp_path / "shards").glob("chunk_*.npz"))) == 1
    monkeypatch.setattr(cnn, "_save_shard", real)
    tiny(tmp_path, workers=2)
    assert snapshot(tmp_path) == snapshot(zoo)


def test_the_algorithm_version_and_dtype_are_part_of_the_identity(tmp_path, zoo):
    spec = json.loads((zoo / "generator.json").read_text())
    assert spec["config"]["algorithm"] == cnn.CNNZooConfig._ALGORITHM
    assert "dtype" not in spec["config"]  # float32, the implicit default
    assert cnn.CNNZooConfig.from_any(spec["config"]).identity() == spec["config"]  # round trip
    with pytest.raises(ValueError, match="differing keys: dtype"):
        tiny(zoo, dtype="bfloat16")
    # a zoo begun by the earlier code (no algorithm key) is not resumed by this one
    old = tmp_path / "old"
    old.mkdir()
    stale = {k: v for k, v in spec["config"].items() if k != "algorithm"}
    (old / "generator.json").write_text(json.dumps({**spec, "config": stale}))
    with pytest.raises(ValueError, match="differing keys: algorithm"):
        tiny(old)
    with pytest.raises(ValueError, match="algorithm=1, but this generator implements"):
        cnn.CNNZooConfig.from_any({**spec["config"], "algorithm": 1})


def test_a_bfloat16_zoo_trains_and_records_its_dtype(tmp_path):
    root = tiny(tmp_path, num_models=2, dtype="bfloat16")
    assert json.loads((root / "generator.json").read_text())["config"]["dtype"] == "bfloat16"
    weights = np.load(root / "weights.npy")
    assert weights.dtype == np.float32 and np.isfinite(weights).all()
    steps = len(TINY["steps"])
    assert not np.array_equal(weights[0], weights[steps - 1])  # it trained


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
def test_fused_activation_and_dropout_match_autograd(relu, dropout):
    torch.manual_seed(0)
    h = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(4, 6, 5, 5, dtype=torch.float64) > 0.3) / 0.7 if dropout else None
    grad = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    fused = cnn._ActDrop.apply(h, keep, relu)
    plain = h.relu() if relu else h.tanh()
    plain = plain if keep is None else plain * keep
    torch.testing.assert_close(fused, plain, rtol=0, atol=0 if relu else 1e-15)
    got, want = (torch.autograd.grad(y, h, grad)[0] for y in (fused, plain))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_tanh_matches_torch_within_float32_rounding():
    h = torch.linspace(-12, 12, 100_001)
    assert (cnn._tanh(h) - torch.tanh(h)).abs().max().item() < 3e-7
    assert (cnn._tanh(h.double()) - torch.tanh(h.double())).abs().max().item() < 1e-15


def test_dropout_masks_keep_each_models_rate_and_expectation():
    rates = torch.tensor([0.0, 0.1, 0.3])
    h = torch.empty(64, 3 * 16, 13, 13).contiguous(memory_format=torch.channels_last)
    keep = cnn._keep(h, rates, torch.Generator().manual_seed(0))
    assert keep.is_contiguous(memory_format=torch.channels_last)  # laid out like h
    keep = keep.view(64, 3, 16, 13, 13)
    for m, p in enumerate(rates.tolist()):
        kept = keep[:, m] > 0
        assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)
        scale = keep[:, m][kept]
        assert torch.allclose(scale, torch.full_like(scale, 1 / (1 - p)), rtol=1e-4)
        assert keep[:, m].mean().item() == pytest.approx(1.0, abs=0.01)  # E[mask·scale] = 1


def test_config_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match=r"generator dtype must be one of \('float32', "
                                         r"'bfloat16'\), got 'float16'"):
        cnn.CNNZooConfig(dtype="float16")
