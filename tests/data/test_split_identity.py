"""Random splits put each member by its own identity: damage to one member moves no other."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _zoo_files import write_transformer_zoo
from test_inr_zoo import write_folder_zoo

from neuralgraph_quasi.data import INRZoo, SmallTransformerZoo
from neuralgraph_quasi.data._zoo import split_position

torch.set_num_threads(1)


def split_of(make, key) -> dict:
    """``{member identity: split}`` over the three splits of a zoo."""
    where = {}
    for split in ("train", "val", "test"):
        data = make(split)
        for i in range(len(data)):
            where[key(data.meta(i))] = split
    return where


def test_transformer_zoo_split_survives_a_corrupt_member(tmp_path):
    rows = write_transformer_zoo(tmp_path, runs=20, epochs=(75,))
    def make(split):
        return SmallTransformerZoo(tmp_path, split=split, log=False, force_reload=True)
    before = split_of(make, lambda m: m["ckpt_file"])
    assert len(before) == 20 and set(before.values()) == {"train", "val", "test"}
    broken = rows[0]["ckpt_file"]
    (tmp_path / broken).write_bytes(b"not a checkpoint")
    after = split_of(make, lambda m: m["ckpt_file"])
    assert set(after) == set(before) - {broken}
    moved = {f: (before[f], after[f]) for f in after if after[f] != before[f]}
    assert moved == {}


def test_inr_random_split_survives_a_deleted_member(tmp_path):
    members = write_folder_zoo(tmp_path, [i % 3 for i in range(20)], hidden=4)
    def make(split):
        return INRZoo(tmp_path, split=split, log=False, force_reload=True)
    before = split_of(make, lambda m: m["idx"])
    (tmp_path / members[3][0]).unlink()
    after = split_of(make, lambda m: m["idx"])
    assert set(after) == set(before) - {3}
    assert {i: before[i] for i in after if after[i] != before[i]} == {}


def test_split_is_seeded_and_close_to_the_fractions():
    fractions = (0.7, 0.15, 0.15)
    def assign(seed, ids):
        out = []
        for i in ids:
            u = split_position(i, seed)
            out.append("train" if u < 0.7 else "val" if u < 0.85 else "test")
        return out
    ids = list(range(1000))
    counts = Counter(assign(3, ids))
    for split, fraction in zip(("train", "val", "test"), fractions, strict=True):
        assert abs(counts[split] / 1000 - fraction) < 0.01, counts
    # 20 consecutive run ids already fill every split
    assert set(assign(3, range(20))) == {"train", "val", "test"}
    assert assign(3, ids) == assign(3, ids)  # deterministic
    assert assign(3, ids) != assign(4, ids)  # the seed matters
    # named runs spread as evenly as numbered ones; different names are independent
    named = Counter(assign(3, [f"run{i}" for i in range(1000)]))
    assert abs(named["test"] / 1000 - 0.15) < 0.01
    assert assign(3, [f"a{i}" for i in range(50)]) != assign(3, [f"b{i}" for i in range(50)])
    for u in (split_position(i, s) for i in ("x", 7, "7", "img_7") for s in (0, 3)):
        assert 0.0 <= u < 1.0
    assert split_position(7, 3) == split_position("7", 3)
    with pytest.raises(TypeError, match="member identity"):
        split_position(1.5, 3)
