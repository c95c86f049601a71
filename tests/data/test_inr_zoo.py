"""INRZoo reads NFN-style SIREN zoos (folder or labels.csv labels, both key namings) exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from neuralgraph_quasi import models, to_model
from neuralgraph_quasi.data import ZooFormatError, ZooNotFoundError
from neuralgraph_quasi.data._zoo import split_position
from neuralgraph_quasi.data.inr_zoo import INRZoo, coordinate_grid, render, siren_keys

torch.set_num_threads(1)  # tiny models: extra threads only add overhead on a busy machine


def random_siren(seed: int, hidden: int = 32, out: int = 1) -> dict[str, torch.Tensor]:
    """A ``models.siren`` state_dict with seeded random values."""
    torch.manual_seed(seed)
    return models.siren(2, hidden, 2, out).state_dict()


def to_nfn_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same state with NFN's ``Siren`` key names (``net.0.linear.weight`` ...)."""
    layers = len(state) // 2
    return {nfn: state[canon] for nfn, canon in siren_keys(layers, "nfn").items()}


def write_folder_zoo(root: Path, labels: list[int], nfn: bool = False, folder: str = "{label}",
                     first: int = 0, **siren) -> list[tuple[str, int, dict]]:
    """One random SIREN per label in ``root/<folder>/net<idx>.pth`` (idx from ``first``);
    returns ``(relative file, label, canonical state)`` per member, in index order."""
    members = []
    for idx, label in enumerate(labels, start=first):
        state = random_siren(100 + idx, **siren)
        rel = f"{folder.format(label=label)}/net{idx}.pth"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(to_nfn_keys(state) if nfn else state, root / rel)
        members.append((rel, label, state))
    return members


def write_labels_csv(root: Path, rows: list[dict]) -> None:
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def assert_members_match(data: INRZoo, members: list[tuple[str, int, dict]]) -> None:
    """Every member rebuilds its file's state bit for bit and carries its label."""
    by_file = {rel: (label, state) for rel, label, state in members}
    assert len(data) == len(members)
    for i in range(len(data)):
        graph, meta = data[i], data.meta(i)
        label, state = by_file[meta["file"]]
        rebuilt = to_model(graph, data.make_model(graph)).state_dict()
        assert rebuilt.keys() == state.keys()
        assert all(torch.equal(rebuilt[k], state[k]) for k in state)
        assert graph.y.dtype == torch.long and graph.y.tolist() == [label] == [meta["label"]]


def test_folder_per_class_round_trips_exactly(tmp_path):
    members = write_folder_zoo(tmp_path, [3, 1, 4, 1, 5, 9])
    data = INRZoo(tmp_path, split="all", log=False)
    assert_members_match(data, members)
    assert [data.meta(i)["idx"] for i in range(len(data))] == list(range(6))
    assert isinstance(data.make_model(), torch.nn.Sequential)


def test_nfn_folders_and_key_names(tmp_path):
    members = write_folder_zoo(tmp_path, [0, 7, 7, 2], nfn=True,
                               folder="randinit_smaller_{label}s")
    assert "net.2.weight" in torch.load(tmp_path / members[0][0], weights_only=True)
    data = INRZoo(tmp_path, split="all", log=False)
    assert_members_match(data, members)  # NFN's keys land on models.siren's
    assert data.targets.tolist() == [0, 7, 7, 2]


def test_labels_csv_gives_per_file_labels(tmp_path):
    (tmp_path / "inrs").mkdir()
    rows, members = [], []
    for idx, label in enumerate([5, 2, 8]):
        state = random_siren(idx)
        rel = f"inrs/image_{idx}.pt"
        torch.save(state, tmp_path / rel)
        rows.append({"file": rel, "label": label, "note": f"n{idx}"})
        members.append((rel, label, state))
    write_labels_csv(tmp_path, rows)
    data = INRZoo(tmp_path, split="all", log=False)
    assert data.labels == "file"
    assert_members_match(data, members)
    assert data.meta(1)["note"] == "n1" and data.meta(1)["idx"] == 1


def test_colour_and_differently_shaped_members_go_to_separate_parts(tmp_path):
    grey = write_folder_zoo(tmp_path, [0, 1])
    colour = write_folder_zoo(tmp_path, [2, 3], first=2, out=3)
    narrow = write_folder_zoo(tmp_path, [4], first=4, hidden=16)
    data = INRZoo(tmp_path, split="all", log=False)
    assert_members_match(data, grey + colour + narrow)
    shapes = {data.meta(i)["label"]: data.make_model(data[i]) for i in range(len(data))}
    assert shapes[2][4].out_features == 3 and shapes[0][4].out_features == 1
    assert shapes[4][0].out_features == 16
    with pytest.raises(ValueError, match="3 architectures"):
        data.make_model()
    x = coordinate_grid(5)
    graph = next(data[i] for i in range(len(data)) if data.meta(i)["label"] == 2)
    assert to_model(graph, data.make_model(graph))(x).shape == (25, 3)


def test_nfn_split_by_image_index_and_default_random_split(tmp_path):
    write_folder_zoo(tmp_path, [i % 3 for i in range(10)])
    kwargs = {"split_mode": "nfn", "nfn_split_points": (6, 8), "log": False}
    splits = {s: INRZoo(tmp_path, split=s, **kwargs) for s in ("train", "val", "test")}
    idx = {s: sorted(d.meta(i)["idx"] for i in range(len(d))) for s, d in splits.items()}
    assert idx == {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7], "test": [8, 9]}
    parts = [INRZoo(tmp_path, split=s, log=False) for s in ("train", "val", "test")]
    members = [{int(d[i].member) for i in range(len(d))} for d in parts]
    assert sum(map(len, members)) == 10 and set.union(*members) == set(range(10))
    for split, data in zip(("train", "val", "test"), parts, strict=True):
        for i in range(len(data)):  # each by its image index alone
            u = split_position(data.meta(i)["idx"], 3)
            assert split == ("train" if u < 0.7 else "val" if u < 0.85 else "test")


def test_prefix_keeps_nfn_augmented_copies_out(tmp_path):
    base = write_folder_zoo(tmp_path, [1, 2, 1], nfn=True, folder="randinit_smaller_{label}s")
    write_folder_zoo(tmp_path, [1, 2, 1], nfn=True, folder="randinit_smaller_aug0_{label}s")
    with pytest.raises(ZooFormatError, match=r"image index 0 appears.*prefix='randinit_smaller'"):
        INRZoo(tmp_path, split="train", split_mode="nfn", log=False)
    assert len(INRZoo(tmp_path, split="all", log=False)) == 6  # both copies, labels from names
    data = INRZoo(tmp_path, split="all", prefix="randinit_smaller", log=False)
    assert_members_match(data, base)


@pytest.mark.parametrize("nfn", [False, True])
def test_missing_and_unknown_keys_name_file_and_key(tmp_path, nfn):
    members = write_folder_zoo(tmp_path, [0, 1], nfn=nfn)
    path = tmp_path / members[1][0]
    state = torch.load(path, weights_only=True)
    bias = "net.1.linear.bias" if nfn else "2.bias"
    torch.save({k: v for k, v in state.items() if k != bias}, path)
    with pytest.raises(ZooFormatError, match=rf"1/net1\.pth: missing key '{bias}'"):
        INRZoo(tmp_path, split="all", log=False)
    extra = "net.0.linear.scale" if nfn else "1.weight"
    torch.save({**state, extra: torch.zeros(1)}, path)
    with pytest.raises(ZooFormatError, match=rf"1/net1\.pth: unknown key '{extra}'"):
        INRZoo(tmp_path, split="all", log=False)


def test_wrong_shapes_and_bad_labels_are_named(tmp_path):
    members = write_folder_zoo(tmp_path, [0, 1])
    path = tmp_path / members[0][0]
    state = torch.load(path, weights_only=True)
    torch.save({**state, "2.weight": torch.zeros(32, 16)}, path)  # a hidden width mismatch
    with pytest.raises(ZooFormatError, match=r"0/net0\.pth: key '2\.weight'.*\[32, 16\]"):
        INRZoo(tmp_path, split="all", log=False)
    torch.save(state, path)
    (tmp_path / "misc").mkdir()
    torch.save(state, tmp_path / "misc" / "x.pth")
    with pytest.raises(ZooFormatError, match=r"misc: cannot read a class label .*'misc'"):
        INRZoo(tmp_path, split="all", log=False)
    write_labels_csv(tmp_path, [{"file": members[0][0], "class": 0}])
    with pytest.raises(ZooFormatError, match=r"labels\.csv: missing column 'label'"):
        INRZoo(tmp_path, split="all", log=False)
    write_labels_csv(tmp_path, [{"file": members[0][0], "label": "zero"}])
    with pytest.raises(ZooFormatError, match=r"labels\.csv: line 2 \(0/net0\.pth\).*'zero'"):
        INRZoo(tmp_path, split="all", on_corrupt="raise", log=False)


def test_corrupt_checkpoint_is_skipped_and_counted_or_raises(tmp_path):
    members = write_folder_zoo(tmp_path, [0, 1, 2])
    (tmp_path / members[1][0]).write_bytes(b"not a checkpoint")
    with pytest.raises(ZooFormatError, match=r"1/net1\.pth: cannot read"):
        INRZoo(tmp_path, split="all", on_corrupt="raise", log=False)
    data = INRZoo(tmp_path, split="all", log=False)
    assert len(data) == 2 and data.skipped["unreadable checkpoints"] == 1


def test_missing_zoo_says_how_to_get_it(tmp_path):
    with pytest.raises(ZooNotFoundError, match=r"make_zoo\.py dataset=inr dataset\.root=.*nowhere"):
        INRZoo(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="class labels"):
        INRZoo(tmp_path, min_accuracy=0.5)


def test_render_is_row_major_over_the_grid():
    model = models.siren()
    image = render(model, 6)
    assert image.shape == (1, 6, 6)
    lin = torch.linspace(-1, 1, 6)
    point = torch.stack([lin[2], lin[5]])[None]  # row 2, column 5
    assert torch.allclose(image[0, 2, 5], model(point)[0, 0])
