"""SmallCNNZoo reads the published Small CNN Zoo format exactly and computes the TF function."""

from __future__ import annotations

import csv
import gzip
import json
import math
import random

import numpy as np
import pytest
import torch

from neuralgraph_quasi import to_model
from neuralgraph_quasi.data import ZooFormatError, ZooNotFoundError
from neuralgraph_quasi.data.cnn_zoo import SmallCNNZoo, read_layout, standard_layout

#: The TensorFlow variables in the order their values lie in a weights row: bias before
#: kernel for some layers, after it for others (the loader must follow the indices).
VARIABLES = [
    ("sequential/conv2d/bias:0", (16,)),
    ("sequential/conv2d/kernel:0", (3, 3, 1, 16)),
    ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
    ("sequential/conv2d_1/bias:0", (16,)),
    ("sequential/conv2d_2/bias:0", (16,)),
    ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
    ("sequential/dense/bias:0", (10,)),
    ("sequential/dense/kernel:0", (16, 10)),
]
COLUMNS = ["config.activation", "config.b_init", "config.dataset", "config.dropout",
           "config.init_std", "config.l2reg", "config.learning_rate", "config.optimizer",
           "config.train_fraction", "config.w_init", "modeldir", "step", "test_accuracy",
           "test_loss", "train_accuracy", "train_loss"]
TORCH_KEY = {"conv2d": "0", "conv2d_1": "2", "conv2d_2": "4", "dense": "8"}


def layout_of(variables=VARIABLES) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """``varname -> (start, end, shape)`` with values laid out in ``variables`` order."""
    out, start = {}, 0
    for name, shape in variables:
        out[name] = (start, start + math.prod(shape), shape)
        start += math.prod(shape)
    return out


def activation_of(run: int) -> str:
    return "tanh" if run % 3 == 0 else "relu"


def write_cnn_zoo(root, runs: int = 12, steps=(0, 86), seed: int = 0, gz: bool = False,
                  nonfinite_rows=(), variables=VARIABLES, columns=COLUMNS):
    """A Small CNN Zoo in the published format (layout.csv rows shuffled).

    Returns ``(weights [N, 4970], metrics rows)``; row ``run * len(steps) + j``.
    """
    rng = np.random.default_rng(seed)
    layout = layout_of(variables)
    size = max(end for _, end, _ in layout.values())
    weights = (rng.standard_normal((runs * len(steps), size)) * 0.3).astype(np.float32)
    for row in nonfinite_rows:
        weights[row, 5] = np.nan
    rows = []
    for run in range(runs):
        for step in steps:
            acc = round(0.1 + 0.8 * ((run * 7919 + step) % 97) / 97, 6)
            rows.append({"config.activation": activation_of(run), "config.b_init": "zeros",
                         "config.dataset": "cifar10", "config.dropout": "0.1",
                         "config.init_std": "0.05", "config.l2reg": "1e-05",
                         "config.learning_rate": "0.001", "config.optimizer": "adam",
                         "config.train_fraction": "1.0", "config.w_init": "RandomNormal",
                         "modeldir": f"/tmp/run{run}", "step": str(step),
                         "test_accuracy": str(acc), "test_loss": "1.5",
                         "train_accuracy": str(acc), "train_loss": "1.4"})
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "weights.npy", weights)
    opener = gzip.open if gz else open
    with opener(root / ("metrics.csv.gz" if gz else "metrics.csv"), "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    names = list(layout)
    random.Random(seed).shuffle(names)  # the file's row order must not matter
    with open(root / "layout.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["varname", "start_idx", "end_idx", "shape"])
        for name in names:
            start, end, shape = layout[name]
            writer.writerow([name, start, end, str(shape)])
    return weights, rows


def tf_params(row: np.ndarray, variables=VARIABLES) -> dict[str, np.ndarray]:
    """``{varname: array}`` of one weights row, in TensorFlow layouts."""
    return {name: row[start:end].reshape(shape)
            for name, (start, end, shape) in layout_of(variables).items()}


def tf_forward(x: np.ndarray, params: dict[str, np.ndarray], activation: str) -> np.ndarray:
    """The Keras model in NumPy: ``x [N, H, W, C]`` (NHWC), HWIO kernels, 'valid' padding,
    stride 2, mean over H and W, ``x @ W + b``. Returns logits ``[N, 10]``."""
    act = np.tanh if activation == "tanh" else (lambda v: np.maximum(v, 0))
    for layer in ("conv2d", "conv2d_1", "conv2d_2"):
        kernel = params[f"sequential/{layer}/kernel:0"]
        bias = params[f"sequential/{layer}/bias:0"]
        kh, kw = kernel.shape[:2]
        h_out = math.ceil((x.shape[1] - kh + 1) / 2)  # TensorFlow's 'valid' output size
        w_out = math.ceil((x.shape[2] - kw + 1) / 2)
        out = np.empty((x.shape[0], h_out, w_out, kernel.shape[3]))
        for i in range(h_out):
            for j in range(w_out):
                patch = x[:, 2 * i:2 * i + kh, 2 * j:2 * j + kw, :]
                out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, kernel) + bias
        x = act(out)
    pooled = x.mean(axis=(1, 2))
    return pooled @ params["sequential/dense/kernel:0"] + params["sequential/dense/bias:0"]


def expected_state(row: np.ndarray) -> dict[str, torch.Tensor]:
    """The PyTorch state of one weights row, converted here independently of the loader."""
    state = {}
    for name, value in tf_params(row).items():
        layer, param = name.split("/")[1], name.split("/")[2].split(":")[0]
        key = TORCH_KEY[layer]
        if param == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            state[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            state[f"{key}.bias"] = torch.from_numpy(value.copy())
    return state


@pytest.fixture
def zoo(tmp_path):
    weights, rows = write_cnn_zoo(tmp_path)
    return tmp_path, weights, rows


def test_members_compute_the_tensorflow_function(zoo):
    root, weights, rows = zoo
    data = SmallCNNZoo(root, split="all", activation=None, log=False)
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(len(data)):
        graph, meta = data[i], data.meta(i)
        model = to_model(graph, data.make_model(graph)).double()
        activation = meta["config.activation"]
        assert isinstance(model[1], torch.nn.Tanh if activation == "tanh" else torch.nn.ReLU)
        size = (28, 27, 32)[i % 3]  # 'valid' stride-2 padding equals padding=0 at any size
        x = rng.random((3, size, size, 1))
        expected = tf_forward(x, tf_params(weights[meta["row"]].astype(np.float64)),
                              activation)
        with torch.no_grad():
            got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
        seen.add(activation)
    assert seen == {"relu", "tanh"}


def test_members_rebuild_the_converted_weights_exactly(zoo):
    root, weights, rows = zoo
    data = SmallCNNZoo(root, split="all", log=False)
    assert len(data) == 8  # relu runs at step 86
    for i in range(len(data)):
        graph, meta = data[i], data.meta(i)
        rebuilt = to_model(graph, data.make_model(graph)).state_dict()
        expected = expected_state(weights[meta["row"]])
        assert rebuilt.keys() == expected.keys()
        assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
        assert graph.y.item() == pytest.approx(float(rows[meta["row"]]["test_accuracy"]))
        assert meta["step"] == "86" and meta["config.activation"] == "relu"


def test_filters_select_activation_and_step_before_splitting(zoo):
    root, _, rows = zoo

    def selected(**kwargs):
        data = SmallCNNZoo(root, split="all", log=False, **kwargs)
        return [data.meta(i)["row"] for i in range(len(data))]

    assert selected() == [i for i, r in enumerate(rows)
                          if r["step"] == "86" and r["config.activation"] == "relu"]
    assert selected(step=0, activation="tanh") == [
        i for i, r in enumerate(rows) if r["step"] == "0" and r["config.activation"] == "tanh"]
    assert sorted(selected(step=None, activation=None)) == list(range(len(rows)))
    high = SmallCNNZoo(root, split="all", min_accuracy=0.5, log=False)
    assert 0 < len(high) < 8 and bool((high.targets >= 0.5).all())
    with pytest.raises(ValueError, match="activation must be one of"):
        SmallCNNZoo(root, activation="sigmoid")


def nfn_split(n: int, seed: int = 0) -> dict[str, list[int]]:
    """NFN's ``_split_indices_iid`` (positions in the fixed row order)."""
    test_point = int(0.5 * n)
    trainval = list(range(test_point))
    random.Random(seed).shuffle(trainval)
    val_point = int(0.8 * len(trainval))
    return {"train": trainval[:val_point], "val": trainval[val_point:],
            "test": list(range(test_point, n))}


@pytest.mark.parametrize("runs", [12, 37])
def test_split_is_nfn_protocol_in_file_order(tmp_path, runs):
    write_cnn_zoo(tmp_path, runs=runs)
    everything = SmallCNNZoo(tmp_path, split="all", activation=None, log=False)
    file_rows = sorted(everything.meta(i)["row"] for i in range(len(everything)))
    expected = nfn_split(len(file_rows))
    for split, positions in expected.items():
        data = SmallCNNZoo(tmp_path, split=split, activation=None, log=False)
        got = [data.meta(i)["row"] for i in range(len(data))]
        assert got == [file_rows[p] for p in positions], split


def test_split_follows_a_given_row_order(zoo, tmp_path_factory):
    root, _, rows = zoo
    order = list(range(len(rows)))
    random.Random(5).shuffle(order)
    path = tmp_path_factory.mktemp("order") / "split.csv"
    path.write_text("".join(f"{i}\n" for i in order))
    everything = SmallCNNZoo(root, split="all", log=False)
    members = sorted((everything.meta(i)["row"] for i in range(len(everything))),
                     key=order.index)
    expected = nfn_split(len(members))
    for split in ("train", "val", "test"):
        data = SmallCNNZoo(root, split=split, log=False, row_order=str(path))
        got = [data.meta(i)["row"] for i in range(len(data))]
        assert got == [members[p] for p in expected[split]], split


def test_nonfinite_rows_are_dropped_and_counted(tmp_path):
    # rows 1 and 3 are runs 0 and 1 at step 86; run 0 is tanh
    write_cnn_zoo(tmp_path, runs=6, nonfinite_rows=(1, 3, 4))
    data = SmallCNNZoo(tmp_path, split="all", activation=None, log=False)
    assert len(data) == 4 and data.skipped["non-finite or filtered"] == 2
    assert {data.meta(i)["row"] for i in range(len(data))} == {5, 7, 9, 11}


def test_gzipped_metrics_are_read(tmp_path):
    weights, rows = write_cnn_zoo(tmp_path, gz=True)
    data = SmallCNNZoo(tmp_path, split="all", log=False)
    assert len(data) == 8
    assert data.targets.tolist() == pytest.approx(
        [float(r["test_accuracy"]) for r in rows
         if r["step"] == "86" and r["config.activation"] == "relu"])


def test_missing_zoo_says_how_to_get_it(tmp_path):
    with pytest.raises(ZooNotFoundError, match=r"make_zoo\.py dataset=cnn_zoo") as info:
        SmallCNNZoo(tmp_path / "nowhere")
    for name in ("weights.npy", "metrics.csv", "layout.csv"):
        assert name in str(info.value)


def test_missing_metrics_column_is_named(tmp_path):
    write_cnn_zoo(tmp_path, columns=[c for c in COLUMNS if c != "test_accuracy"])
    with pytest.raises(ZooFormatError, match=r"metrics\.csv: missing column 'test_accuracy'"):
        SmallCNNZoo(tmp_path, log=False)


def test_truncated_or_mismatched_weights_name_the_file(tmp_path):
    write_cnn_zoo(tmp_path)
    path = tmp_path / "weights.npy"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ZooFormatError, match=r"weights\.npy: cannot read"):
        SmallCNNZoo(tmp_path, log=False)
    path.write_bytes(b"not numpy at all")
    with pytest.raises(ZooFormatError, match=r"weights\.npy: cannot read"):
        SmallCNNZoo(tmp_path, log=False)
    np.save(path, np.zeros((5, 4970), np.float32))
    with pytest.raises(ZooFormatError, match=r"weights\.npy: 5 rows but .*metrics\.csv has 24"):
        SmallCNNZoo(tmp_path, log=False)


@pytest.mark.parametrize("variables, message", [
    ([*VARIABLES[:-1], ("sequential/dense/weights:0", (16, 10))],
     r"layout\.csv: unknown variable 'sequential/dense/weights:0'"),
    ([*VARIABLES[:-1], ("sequential/dense/kernel:0", (16, 9))],
     r"layout\.csv: variable 'sequential/dense/bias:0': shape \(10,\), expected \(9,\)"),
    ([*VARIABLES[:1], ("sequential/conv2d/kernel:0", (5, 5, 1, 16)), *VARIABLES[2:]],
     r"layout\.csv: variable 'sequential/conv2d/kernel:0': shape \(5, 5, 1, 16\) is not"),
    (VARIABLES[:-1], r"layout\.csv: variable 'sequential/dense/bias:0' has no matching kernel"),
    ([*VARIABLES, ("sequential/conv2d_3/bias:0", (16,))],
     r"layout\.csv: expected 3 conv2d layers and 1 dense layer"),
])
def test_layout_mismatch_names_file_and_varname(tmp_path, variables, message):
    write_cnn_zoo(tmp_path, runs=2, variables=variables)
    with pytest.raises(ZooFormatError, match=message):
        SmallCNNZoo(tmp_path, log=False)


def test_unreadable_metrics_rows_are_skipped_and_counted_or_raise(tmp_path):
    write_cnn_zoo(tmp_path, runs=4)
    path = tmp_path / "metrics.csv"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace("relu", "sigmoid", 1)  # row 3: run 1 at step 86
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ZooFormatError, match=r"metrics\.csv: row 3: unknown config\.activation"):
        SmallCNNZoo(tmp_path, split="all", on_corrupt="raise", log=False)
    data = SmallCNNZoo(tmp_path, split="all", log=False)
    assert len(data) == 1 and data.skipped["unreadable metrics rows"] == 1


def test_generated_zoo_defaults_to_its_last_step(tmp_path):
    write_cnn_zoo(tmp_path, runs=3, steps=(0, 1, 5))
    with pytest.raises(ZooFormatError, match="no row with step=86"):
        SmallCNNZoo(tmp_path, log=False)
    (tmp_path / "generator.json").write_text(json.dumps({"config": {}}))
    data = SmallCNNZoo(tmp_path, split="all", activation=None, log=False)
    assert data.step == 5 and {data.meta(i)["step"] for i in range(len(data))} == {"5"}


def test_two_architectures_need_the_graph(zoo):
    root, _, _ = zoo
    data = SmallCNNZoo(root, split="all", activation=None, log=False)
    with pytest.raises(ValueError, match="2 architectures"):
        data.make_model()
    kinds = {type(data.make_model(data[i])[1]).__name__ for i in range(len(data))}
    assert kinds == {"ReLU", "Tanh"}
    assert sum(p.numel() for p in data.make_model(data[0]).parameters()) == 4970


def test_standard_layout_round_trips_through_layout_csv(tmp_path):
    layout = standard_layout()
    path = tmp_path / "layout.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["varname", "start_idx", "end_idx", "shape"])
        writer.writeheader()
        writer.writerows(layout.rows())
    assert read_layout(str(path)) == layout
    assert layout.size == 4970
    assert layout.rows()[0]["varname"] == "sequential/conv2d/bias:0"  # bias first, as TF
