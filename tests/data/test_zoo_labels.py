"""Labels are validated: accuracies in [0, 1], class labels integers in [0, C); a garbled
table stops with an error naming the file and line."""

from __future__ import annotations

import csv

import pytest
import torch
from _zoo_files import write_transformer_zoo
from test_cnn_zoo import write_cnn_zoo
from test_inr_zoo import write_folder_zoo, write_labels_csv

from neuralgraph_quasi.data import INRZoo, SmallCNNZoo, SmallTransformerZoo, ZooFormatError

torch.set_num_threads(1)


def rewrite_csv(path, edit) -> None:
    """Apply ``edit(rows)`` to a CSV's data rows (lists of strings, header excluded)."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    edit(header, rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.mark.parametrize("bad", ["nan", "inf", "1.5", "-3", "abc"])
def test_transformer_bad_accuracy_is_skipped_or_raises(tmp_path, bad):
    write_transformer_zoo(tmp_path, runs=4, epochs=(75,))
    path = tmp_path / "metadata" / "ag_news.csv"
    rewrite_csv(path, lambda h, rows: rows[2].__setitem__(h.index("test_accuracy"), bad))
    with pytest.raises(ZooFormatError, match=rf"ag_news\.csv: line 4 .*accuracy '{bad}'"):
        SmallTransformerZoo(tmp_path, split="all", on_corrupt="raise", log=False)
    data = SmallTransformerZoo(tmp_path, split="all", log=False)
    assert len(data) == 3 and data.skipped["bad labels"] == 1
    assert bool(((data.targets >= 0) & (data.targets <= 1)).all())


def test_transformer_garbage_rows_and_bytes_name_file_and_line(tmp_path):
    write_transformer_zoo(tmp_path, runs=3, epochs=(75,))
    path = tmp_path / "metadata" / "ag_news.csv"
    text = path.read_text().splitlines()
    path.write_text("\n".join([*text[:2], "garbage", *text[2:]]) + "\n")
    with pytest.raises(ZooFormatError, match=r"ag_news\.csv: line 3: 1 field"):
        SmallTransformerZoo(tmp_path, split="all", log=False)
    path.write_bytes(b"\n".join(t.encode() for t in text[:2]) + b"\n\xff\xfe\x00,\x81\n")
    with pytest.raises(ZooFormatError, match=r"ag_news\.csv: cannot read"):
        SmallTransformerZoo(tmp_path, split="all", log=False)


@pytest.mark.parametrize("bad", ["nan", "1.5", "-0.1"])
def test_cnn_bad_accuracy_is_skipped_or_raises(tmp_path, bad):
    write_cnn_zoo(tmp_path, runs=4)
    rewrite_csv(tmp_path / "metrics.csv",
                lambda h, rows: rows[3].__setitem__(h.index("test_accuracy"), bad))
    with pytest.raises(ZooFormatError, match=rf"metrics\.csv: row 3 \(line 5\).*'{bad}'"):
        SmallCNNZoo(tmp_path, split="all", on_corrupt="raise", log=False)
    data = SmallCNNZoo(tmp_path, split="all", log=False)
    assert len(data) == 1 and data.skipped["bad labels"] == 1


@pytest.mark.parametrize("bad", ["-1", "1.5", "nan", "x"])
def test_inr_bad_class_label_is_skipped_or_raises(tmp_path, bad):
    members = write_folder_zoo(tmp_path, [0, 1, 2, 1], hidden=4)
    rows = [{"file": rel, "label": str(label)} for rel, label, _ in members]
    rows[1]["label"] = bad
    write_labels_csv(tmp_path, rows)
    message = rf"labels\.csv: line 3 \(1/net1\.pth\): label '{bad}'"
    with pytest.raises(ZooFormatError, match=message):
        INRZoo(tmp_path, split="all", on_corrupt="raise", log=False)
    data = INRZoo(tmp_path, split="all", log=False)
    assert len(data) == 3 and data.skipped["bad labels"] == 1


def test_inr_labels_beyond_num_classes_are_skipped(tmp_path):
    write_folder_zoo(tmp_path, [0, 1, 5, 1], hidden=4)
    with pytest.raises(ZooFormatError, match=r"5/net2\.pth: label 5 is not in \[0, 3\)"):
        INRZoo(tmp_path, split="all", classes=3, on_corrupt="raise", log=False)
    data = INRZoo(tmp_path, split="all", classes=3, log=False)
    assert data.targets.tolist() == [0, 1, 1] and data.skipped["bad labels"] == 1
    assert len(INRZoo(tmp_path, split="all", log=False)) == 4  # C unknown: any label >= 0


def test_inr_short_or_undecodable_labels_csv_names_the_line(tmp_path):
    members = write_folder_zoo(tmp_path, [0, 1], hidden=4)
    (tmp_path / "labels.csv").write_text(f"file,label\n{members[0][0]},0\n{members[1][0]}\n")
    with pytest.raises(ZooFormatError, match=r"labels\.csv: line 3: 1 field"):
        INRZoo(tmp_path, split="all", log=False)
    (tmp_path / "labels.csv").write_bytes(b"file,label\n\xff\xfe,1\n")
    with pytest.raises(ZooFormatError, match=r"labels\.csv: cannot read"):
        INRZoo(tmp_path, split="all", log=False)
