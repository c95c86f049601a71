"""The digits INR zoo generator: faithful fits, right labels, resume, no-op rerun, seeds."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from neuralgraph_quasi import models, symmetry, to_model
from neuralgraph_quasi.data.generate import inr
from neuralgraph_quasi.data.images import load_digits
from neuralgraph_quasi.data.inr_zoo import INRZoo, coordinate_grid, render

torch.set_num_threads(1)  # tiny models: extra threads only add overhead on a busy machine

# 8x8 digits (the original resolution) fit in 100 steps; 3 chunks, the last one partial.
TINY = {"num_models": 12, "image_size": 8, "steps": 100, "models_per_chunk": 5, "seed": 0,
        "progress": False, "device": "cpu"}
# The digits take 17 grey levels (k/16), 0.125 apart on the INRs' [-1, 1] scale. An MSE of
# 1e-3 is an RMS error of 0.032, a quarter of one level (PSNR 36 dB), while predicting the
# mean image gives ~0.3: each INR must hold its own image, not a blur of the class.
MAX_MSE = 1e-3


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), caches excluded."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "processed" not in p.parts}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file()}


def load_inr(path: Path, out: int = 1) -> torch.nn.Module:
    model = models.siren(2, 32, 2, out)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return inr.generate(TINY, root=str(tmp_path_factory.mktemp("inr") / "zoo"))


def test_each_inr_reconstructs_its_own_image_and_carries_its_digit(zoo):
    images, labels = load_digits(8)
    targets = images[:12] * 2 - 1  # [12, 1, 8, 8]
    with open(zoo / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["idx"]) for r in rows] == list(range(12))
    for row in rows:
        idx, label = int(row["idx"]), int(row["label"])
        assert label == int(labels[idx])
        assert row["file"] == f"randinit_smaller_{label}s/net{idx}.pth"
        with torch.no_grad():
            image = render(load_inr(zoo / row["file"]), 8)
        errors = (targets - image).square().mean((1, 2, 3))  # against every image
        assert errors[idx] < MAX_MSE
        assert int(errors.argmin()) == idx
        assert float(row["mse"]) == pytest.approx(float(errors[idx]), rel=1e-3, abs=1e-9)


def test_generated_zoo_loads_with_its_labels(zoo):
    _, labels = load_digits(8)
    data = INRZoo(zoo, split="all", log=False)
    assert len(data) == 12
    for i in range(len(data)):
        assert data[i].y.item() == int(labels[data.meta(i)["idx"]])
    folders = INRZoo(zoo, split="all", labels="folder", prefix="randinit_smaller", log=False)
    assert folders.targets.tolist() == labels[:12].tolist()


def test_siren_symmetries_preserve_the_image(zoo):
    data = INRZoo(zoo, split="all", log=False)
    graph = data[3]
    element = symmetry.sample(graph, torch.Generator().manual_seed(0),
                              kinds=("permutation", "sign"))
    moved = symmetry.act(element, graph)
    assert not torch.equal(moved.edge_attr, graph.edge_attr)
    assert bool((element.scale == -1).any())  # some sine units flipped
    with torch.no_grad():
        before = render(to_model(graph, data.make_model(graph)).double(), 8)
        after = render(to_model(moved, data.make_model(graph)).double(), 8)
        assert torch.allclose(after, before, rtol=0, atol=1e-12)
        broken = to_model(graph, data.make_model(graph)).double()
        broken[0].weight.copy_(broken[0].weight.flip(0))  # permute units, not their consumers
        assert (render(broken, 8) - before).abs().max() > 0.1  # negative control


def test_rerun_is_a_no_op(zoo):
    before, stamps = tree(zoo), mtimes(zoo)
    inr.generate(TINY, root=str(zoo), progress=True, num_threads=1)  # runtime keys may change
    assert tree(zoo) == before and mtimes(zoo) == stamps


def test_interrupted_run_resumes_to_the_same_files(zoo, tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    real, calls = inr._write_chunk, []

    def write_then_crash(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second chunk
        real(*args, **kwargs)

    monkeypatch.setattr(inr, "_write_chunk", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        inr.generate(TINY, root=str(root))
    assert not (root / "labels.csv").exists()
    first_chunk = mtimes(root)
    monkeypatch.setattr(inr, "_write_chunk", real)
    inr.generate(TINY, root=str(root))
    assert tree(root) == tree(zoo)  # identical to an uninterrupted run
    assert all(mtimes(root)[f] == t for f, t in first_chunk.items())  # chunk 0 not redone


def test_a_chunk_missing_one_file_is_refitted(zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(zoo, root)
    victim = root / "randinit_smaller_6s" / "net6.pth"  # chunk 1 (images 5..9)
    victim.unlink()
    other_chunks = [f"net{i}.pth" for i in (0, 1, 2, 3, 4, 10, 11)]
    untouched = {f: t for f, t in mtimes(root).items() if Path(f).name in other_chunks}
    assert len(untouched) == 7
    inr.generate(TINY, root=str(root))
    assert tree(root) == tree(zoo)
    assert all(mtimes(root)[f] == t for f, t in untouched.items())


def test_config_mismatch_names_the_keys(zoo):
    with pytest.raises(ValueError, match=r"differing keys: lr, steps\b"):
        inr.generate(TINY, root=str(zoo), steps=50, lr=0.01)
    with pytest.raises(ValueError, match=r"unknown INR zoo config keys: \['step'\]"):
        inr.generate(TINY, root=str(zoo), step=50)
    with pytest.raises(ValueError, match="1..1797"):
        inr.INRZooConfig(num_models=1798)


def test_same_seed_same_bytes_other_seed_other_inrs(zoo, tmp_path):
    again = inr.generate(TINY, root=str(tmp_path / "again"))
    assert tree(again) == tree(zoo)
    other = inr.generate({**TINY, "num_models": 2}, root=str(tmp_path / "other"), seed=1)
    a = torch.load(zoo / "randinit_smaller_0s" / "net0.pth", weights_only=True)
    b = torch.load(other / "randinit_smaller_0s" / "net0.pth", weights_only=True)
    assert not torch.equal(a["2.weight"], b["2.weight"])


def test_stacked_forward_matches_siren_and_init_follows_sitzmann():
    cfg = inr.INRZooConfig(**{k: v for k, v in TINY.items()})
    params = inr.init_params(range(4), cfg)
    assert torch.equal(inr.init_params([2], cfg)["0.weight"][0], params["0.weight"][2])
    assert params["0.weight"].abs().max() <= 1 / 2  # U(-1/in, 1/in), in = 2
    bound = (6 / 32) ** 0.5 / 30
    assert params["2.weight"].abs().max() <= bound and params["4.weight"].abs().max() <= bound
    assert params["2.weight"].abs().max() > 0.9 * bound
    coords = coordinate_grid(5, torch.float64)
    stacked = inr.stacked_forward({k: v.double() for k, v in params.items()}, coords, 30.0)
    for m in range(4):
        model = models.siren().double()
        model.load_state_dict({k: v[m] for k, v in params.items()})
        assert torch.allclose(stacked[m], model(coords), atol=1e-12)
