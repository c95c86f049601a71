"""The processed cache follows its sources: a completed, regenerated, shrunk, truncated or
relabelled zoo is rebuilt in place (with a log line); an unchanged one is not."""

from __future__ import annotations

import csv
import logging
import os

import pytest
import torch
from _zoo_files import write_transformer_zoo
from test_cnn_zoo import write_cnn_zoo
from test_inr_zoo import write_folder_zoo

from neuralgraph_quasi.data import INRZoo, SmallCNNZoo, SmallTransformerZoo, ZooNotFoundError

torch.set_num_threads(1)
REBUILT = "rebuilding the cache"


def load(cls, root, caplog, **kwargs):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuralgraph_quasi.data._zoo"):
        data = cls(root, split="all", log=False, **kwargs)
    return data, REBUILT in caplog.text


def test_unchanged_zoo_reuses_its_cache(tmp_path, caplog):
    write_transformer_zoo(tmp_path, runs=4, epochs=(75,))
    first, _ = load(SmallTransformerZoo, tmp_path, caplog)
    cache = os.path.join(first.processed_dir, "zoo.pt")
    stamp = os.stat(cache).st_mtime_ns
    again, rebuilt = load(SmallTransformerZoo, tmp_path, caplog)
    assert not rebuilt and os.stat(cache).st_mtime_ns == stamp and len(again) == 4


def test_transformer_zoo_grown_regenerated_shrunk_and_truncated(tmp_path, caplog):
    write_transformer_zoo(tmp_path, runs=4, epochs=(75,))
    assert len(load(SmallTransformerZoo, tmp_path, caplog)[0]) == 4
    rows = write_transformer_zoo(tmp_path, runs=16, epochs=(75,))  # the zoo was completed
    data, rebuilt = load(SmallTransformerZoo, tmp_path, caplog)
    assert rebuilt and len(data) == 16
    assert "small_transformer_zoo" in caplog.text and "zoo.pt" in caplog.text
    # regenerated with other labels (same file names): new targets
    path = tmp_path / "metadata" / "ag_news.csv"
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    for row in table:
        row["test_accuracy"] = str(round(1 - float(row["test_accuracy"]), 4))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    data, rebuilt = load(SmallTransformerZoo, tmp_path, caplog)
    assert rebuilt
    by_file = {data.meta(i)["ckpt_file"]: float(data[i].y) for i in range(len(data))}
    assert all(abs(by_file[r["ckpt_file"]] - float(r["test_accuracy"])) < 1e-6 for r in table)
    # a member deleted, another truncated
    (tmp_path / rows[0]["ckpt_file"]).unlink()
    blob = (tmp_path / rows[1]["ckpt_file"]).read_bytes()
    (tmp_path / rows[1]["ckpt_file"]).write_bytes(blob[: len(blob) // 2])
    data, rebuilt = load(SmallTransformerZoo, tmp_path, caplog)
    assert rebuilt and len(data) == 14 and data.skipped["unreadable checkpoints"] == 2


def test_inr_zoo_sees_new_and_deleted_files(tmp_path, caplog):
    members = write_folder_zoo(tmp_path, [0, 1, 2], hidden=4)
    assert len(load(INRZoo, tmp_path, caplog)[0]) == 3
    write_folder_zoo(tmp_path, [1, 2], first=3, hidden=4)
    data, rebuilt = load(INRZoo, tmp_path, caplog)
    assert rebuilt and len(data) == 5
    (tmp_path / members[0][0]).unlink()
    data, rebuilt = load(INRZoo, tmp_path, caplog)
    assert rebuilt and sorted(data.meta(i)["idx"] for i in range(len(data))) == [1, 2, 3, 4]


def test_cnn_zoo_sees_new_weights_and_relabelled_metrics(tmp_path, caplog):
    write_cnn_zoo(tmp_path, runs=4)
    before, _ = load(SmallCNNZoo, tmp_path, caplog)
    old_values = before.architecture(0)["values"].clone()
    write_cnn_zoo(tmp_path, runs=4, seed=1)  # regenerated with another seed
    data, rebuilt = load(SmallCNNZoo, tmp_path, caplog)
    assert rebuilt and not torch.equal(data.architecture(0)["values"], old_values)
    path = tmp_path / "metrics.csv"
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    for row in table:
        row["test_accuracy"] = "0.125"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    data, rebuilt = load(SmallCNNZoo, tmp_path, caplog)
    assert rebuilt and data.targets.tolist() == [0.125] * len(data)


def test_unreadable_cache_is_rebuilt(tmp_path, caplog):
    write_transformer_zoo(tmp_path, runs=3, epochs=(75,))
    first, _ = load(SmallTransformerZoo, tmp_path, caplog)
    with open(os.path.join(first.processed_dir, "zoo.pt"), "wb") as f:
        f.write(b"truncated")
    data, rebuilt = load(SmallTransformerZoo, tmp_path, caplog)
    assert rebuilt and "cannot be read" in caplog.text and len(data) == 3


def test_cache_without_its_sources_says_how_to_get_them(tmp_path, caplog):
    write_transformer_zoo(tmp_path, runs=3, epochs=(75,))
    load(SmallTransformerZoo, tmp_path, caplog)
    (tmp_path / "metadata" / "ag_news.csv").unlink()
    with pytest.raises(ZooNotFoundError, match=r"make_zoo\.py.*cannot be checked"):
        SmallTransformerZoo(tmp_path, split="all", log=False)
