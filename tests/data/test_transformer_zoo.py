"""SmallTransformerZoo reads the published layout exactly, filters, splits and caches."""

from __future__ import annotations

import pytest
import torch
from _zoo_files import write_transformer_zoo
from torch_geometric.loader import DataLoader

from neuralgraph_quasi import symmetry, to_model
from neuralgraph_quasi.data import SmallTransformerZoo, ZooFormatError, ZooNotFoundError
from neuralgraph_quasi.data._zoo import split_position


@pytest.fixture
def zoo_root(tmp_path):
    write_transformer_zoo(tmp_path, runs=8)
    return tmp_path


def test_members_rebuild_their_checkpoint_exactly(zoo_root):
    data = SmallTransformerZoo(zoo_root, split="all", log=False)
    assert len(data) == 8  # epoch 75 only
    for i in range(len(data)):
        graph, meta = data[i], data.meta(i)
        state = torch.load(zoo_root / meta["ckpt_file"], weights_only=True)
        rebuilt = to_model(graph, data.make_model(graph)).state_dict()
        assert rebuilt.keys() == state.keys()
        assert all(torch.equal(rebuilt[k], state[k]) for k in state)
        assert graph.y.item() == pytest.approx(float(meta["test_accuracy"]))
        assert meta["ckpt_epoch"] == "75"


def test_splits_partition_and_threshold_filters_before_splitting(zoo_root):
    parts = {s: SmallTransformerZoo(zoo_root, split=s, log=False) for s in ("train", "val", "test")}
    members = [set(int(d[i].member) for i in range(len(d))) for d in parts.values()]
    assert sum(len(m) for m in members) == 8
    assert set.union(*members) == set(range(8))
    for split, data in parts.items():  # each run by its own position (run<i>: stem + i)
        for i in range(len(data)):
            run = data.meta(i)["ckpt_file"].split("/")[1].split("_")[0]
            u = split_position(run, 3)
            assert split == ("train" if u < 0.7 else "val" if u < 0.85 else "test")
    high = SmallTransformerZoo(zoo_root, split="all", min_accuracy=0.6, log=False)
    assert len(high) == 4 and bool((high.targets >= 0.6).all())


def test_epoch_selection_and_generated_default(zoo_root):
    first = SmallTransformerZoo(zoo_root, split="all", epoch=1, log=False)
    assert {first.meta(i)["ckpt_epoch"] for i in range(len(first))} == {"1"}
    (zoo_root / "generator.json").write_text("{}")
    generated = SmallTransformerZoo(zoo_root, split="all", log=False)
    assert generated.epoch == "75"  # the last epoch present


def test_spurious_queries_bias_is_dropped_and_counted(tmp_path):
    write_transformer_zoo(tmp_path, runs=3, stray_bias_runs=(0, 2))
    data = SmallTransformerZoo(tmp_path, split="all", log=False, force_reload=True)
    assert len(data) == 3
    assert data.skipped["spurious queries.bias keys dropped"] == 2


def test_unknown_and_missing_keys_name_file_and_key(tmp_path):
    rows = write_transformer_zoo(tmp_path, runs=2, epochs=(75,))
    path = tmp_path / rows[1]["ckpt_file"]
    state = torch.load(path, weights_only=True)
    torch.save({**state, "encoder.0.extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ZooFormatError, match=r"run1_75_.*unknown key 'encoder\.0\.extra\.weight'"):
        SmallTransformerZoo(tmp_path, split="all", log=False)
    del state["encoder.1.fc1.bias"]
    torch.save(state, path)
    with pytest.raises(ZooFormatError, match=r"run1_75_.*missing key 'encoder\.1\.fc1\.bias'"):
        SmallTransformerZoo(tmp_path, split="all", log=False)


def test_corrupt_checkpoint_is_skipped_and_counted_or_raises(tmp_path):
    rows = write_transformer_zoo(tmp_path, runs=3, epochs=(75,))
    (tmp_path / rows[1]["ckpt_file"]).write_bytes(b"not a checkpoint")
    with pytest.raises(ZooFormatError, match="run1_75_.*cannot read"):
        SmallTransformerZoo(tmp_path, split="all", on_corrupt="raise", log=False)
    data = SmallTransformerZoo(tmp_path, split="all", log=False)
    assert len(data) == 2 and data.skipped["unreadable checkpoints"] == 1


def test_class_count_is_read_from_checkpoints(tmp_path):
    write_transformer_zoo(tmp_path, runs=2, epochs=(75,), num_classes=10)
    data = SmallTransformerZoo(tmp_path, split="all", log=False)
    assert data.make_model().classifier.fc2.out_features == 10


def test_mnist_zoo_carries_its_patch_embedding(tmp_path):
    rows = write_transformer_zoo(tmp_path, name="mnist", runs=2, epochs=(75,), num_classes=10)
    data = SmallTransformerZoo(tmp_path, name="mnist", split="all", log=False)
    graph = data[0]
    state = torch.load(tmp_path / rows[0]["ckpt_file"], weights_only=True)
    rebuilt = to_model(graph, data.make_model(graph)).state_dict()
    assert "embedding.pos_embedding" in rebuilt
    assert all(torch.equal(rebuilt[k], state[k]) for k in state)


def test_missing_zoo_says_how_to_get_it(tmp_path):
    with pytest.raises(ZooNotFoundError, match=r"make_zoo\.py dataset=agnews_tf"):
        SmallTransformerZoo(tmp_path / "nowhere")


def test_cache_is_reused_and_settings_change_reprocesses(zoo_root, monkeypatch):
    SmallTransformerZoo(zoo_root, split="all", log=False)

    def no_reading(self):
        raise ZooFormatError("read() called")

    monkeypatch.setattr(SmallTransformerZoo, "read", no_reading)
    # unchanged files and settings: the cache alone serves them
    assert len(SmallTransformerZoo(zoo_root, split="all", log=False)) == 8
    with pytest.raises(ZooFormatError, match="read"):  # another epoch re-reads the files
        SmallTransformerZoo(zoo_root, split="all", epoch=1, log=False)


def test_batches_and_augmentation(zoo_root):
    data = SmallTransformerZoo(zoo_root, split="all", log=False,
                               transform=symmetry.RandomSymmetry())
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch.num_graphs == 4 and batch.y.shape == (4,)
    plain = SmallTransformerZoo(zoo_root, split="all", log=False)
    assert not torch.equal(data[0].edge_attr, plain[0].edge_attr)  # augmented
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        a = to_model(plain[0], plain.make_model())(x)
        b = to_model(data[0], data.make_model())(x)
    assert torch.allclose(a, b, atol=1e-4)  # same function (float32)


def test_pre_transform_is_applied_once_into_its_own_cache_and_pre_filter_drops(zoo_root):
    plain = SmallTransformerZoo(zoo_root, split="all", log=False)
    symmetric = symmetry.RandomSymmetry(kinds=["permutation", "head_permutation"],
                                        generator=torch.Generator().manual_seed(0))
    moved = SmallTransformerZoo(zoo_root, split="all", log=False, pre_transform=symmetric)
    assert moved.processed_dir != plain.processed_dir
    assert not torch.equal(moved[0].edge_attr, plain[0].edge_attr)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # permutations are exact: same outputs up to float32 summation order
        a = to_model(plain[0], plain.make_model())(x)
        b = to_model(moved[0], moved.make_model())(x)
    assert torch.allclose(a, b, atol=1e-5)
    again = SmallTransformerZoo(zoo_root, split="all", log=False, pre_transform=symmetric)
    assert torch.equal(again[0].edge_attr, moved[0].edge_attr)  # cached, not redrawn
    kept = SmallTransformerZoo(zoo_root, split="all", log=False,
                               pre_filter=lambda g: g.y.item() >= 0.6)
    assert len(kept) == 4 and kept.skipped["non-finite or filtered"] == 4
