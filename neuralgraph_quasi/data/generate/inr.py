"""Generate a SIREN INR zoo of scikit-learn's digits, in NFN's layout.

:func:`generate` fits one :func:`~neuralgraph_quasi.models.siren` per image (by
default 2 -> 32 -> 32 -> 1, ``w0 = 30``) to ``num_models`` digits from
:func:`~neuralgraph_quasi.data.images.load_digits`, *many INRs at once*: the
parameters of a chunk of ``models_per_chunk`` INRs are stacked ``[M, ...]`` tensors,
the forward is batched matmuls over the model axis (:func:`stacked_forward`) and one
Adam updates them all (Adam is elementwise, and the loss is a sum of per-INR losses,
so every INR trains exactly as it would alone).

Each INR maps the pixel grid of :func:`~neuralgraph_quasi.data.inr_zoo.coordinate_grid`
to the intensities scaled to ``[-1, 1]`` (``2 * pixel - 1``, NFN's normalisation).
Initialisation as in Sitzmann et al. (2020): first layer ``U(-1/in, 1/in)``, the
others ``U(-sqrt(6/in)/w0, sqrt(6/in)/w0)``, biases ``U(-1/sqrt(in), 1/sqrt(in))``
(PyTorch's default), drawn from a generator seeded by ``(seed, image index)``: an
image's initialisation does not depend on the chunking or on ``num_models``.

Layout written under ``root`` (what :class:`~neuralgraph_quasi.data.INRZoo` reads)::

    randinit_smaller_<label>s/net<idx>.pth   one state_dict per image (keys 0.weight .. 4.bias)
    manifest/chunk_<start>_<stop>.csv        per chunk: file,label,idx,mse,psnr
    labels.csv                               all chunks' rows, written once all are done
    generator.json                           the config (identity of the zoo) and the format

Measured on 2 shared CPU cores (load 3-5), one thread, 100 steps, chunks of 128:
28x28 digits (the default), 512 INRs: 17-19 INRs/s (20 per CPU-second), PSNR median
48 dB, minimum 41 dB (MSE median 6e-5, max 3e-4 on ``[-1, 1]``); all 1,797: 2.5 min,
PSNR median 48 dB, minimum 37 dB (MSE max 8e-4). 16x16: 51 INRs/s, PSNR median 65 dB,
minimum 54 dB; 8x8: 140 INRs/s. Two threads were slower than one on the busy machine.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ... import models
from .._atomic import (
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    csv_text,
)
from ..images import load_digits
from ..inr_zoo import LABELS_FILE, coordinate_grid
from ._stacked import ZooConfigBase, check_identity

__all__ = ["INRZooConfig", "generate", "init_params", "stacked_forward", "fit_chunk",
           "psnr", "MANIFEST_COLUMNS"]

MANIFEST_COLUMNS = ("file", "label", "idx", "mse", "psnr")
_RUNTIME_KEYS = ("root", "device", "num_threads", "progress")  # may change between runs
_FORMAT = {
    "layout": "<prefix>_<label>s/net<idx>.pth, labels.csv (file,label,idx,mse,psnr)",
    "state_dict": "neuralgraph_quasi.models.siren(in_features=2, hidden, depth, 1, w0)",
    "inputs": "coordinate_grid(image_size): (lin[r], lin[c]), lin = linspace(-1, 1, size)",
    "targets": "2 * intensity - 1, intensities of load_digits(image_size) in [0, 1]",
    "psnr": "10 * log10(4 / mse) (peak-to-peak range 2)",
}


# ----------------------------------------------------------------------------- config

@dataclass
class INRZooConfig(ZooConfigBase):
    """Everything that defines a digits INR zoo. Defaults: the CPU zoo (512 INRs, ~30 s).

    Data: the first ``num_models`` (<= 1,797) digits of ``load_digits(image_size)``
    (8 is the original resolution; 16 and 28 are bilinear upsamplings; 28 is MNIST's
    and NFN's grid).

    INR: ``hidden``, ``depth``, ``w0`` of :func:`~neuralgraph_quasi.models.siren`.

    Fit: ``steps`` full-batch Adam steps (every pixel each step) at learning rate ``lr``
    on the mean squared error.

    Files: ``prefix`` of the class folders (``<prefix>_<label>s``, NFN's naming).

    Execution: ``models_per_chunk`` INRs fitted at once (part of the zoo's identity: it
    sets the manifest shards), ``device`` (``"auto"``: CUDA when available),
    ``num_threads`` (torch CPU threads while generating; ``None``: leave as is; 1 is
    fastest on a busy machine), ``progress`` (tqdm bar). ``root``, ``device``,
    ``num_threads`` and ``progress`` may change between runs of one zoo; any other key
    must match ``root/generator.json``.
    """

    _label: ClassVar[str] = "INR"
    _RUNTIME_KEYS: ClassVar[tuple[str, ...]] = _RUNTIME_KEYS

    root: str = "data/inr_digits"
    num_models: int = 512
    seed: int = 0
    image_size: int = 28
    hidden: int = 32
    depth: int = 2
    w0: float = 30.0
    steps: int = 100
    lr: float = 3e-3
    prefix: str = "randinit_smaller"
    models_per_chunk: int = 128
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.num_models <= 1797:
            raise ValueError(f"num_models must lie in 1..1797 (the digits), got {self.num_models}")
        for key in ("image_size", "hidden", "depth", "steps", "models_per_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


# ----------------------------------------------------------------------------- fitting

def _layer_shapes(cfg: INRZooConfig) -> dict[str, tuple[int, ...]]:
    """``models.siren`` state_dict names and shapes, in order."""
    model = models.siren(2, cfg.hidden, cfg.depth, 1, cfg.w0)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _model_seed(seed: int, idx: int) -> int:
    return int(np.random.SeedSequence([seed, idx, 0x51EE]).generate_state(1, np.uint64)[0] >> 1)


def init_params(indices: Sequence[int], cfg: INRZooConfig) -> dict[str, Tensor]:
    """SIREN initialisations of the images ``indices``, stacked: ``{name: [M, *shape]}``.

    Weights of the first layer ``U(-1/in, 1/in)``, of the others
    ``U(-sqrt(6/in)/w0, sqrt(6/in)/w0)``; biases ``U(-1/sqrt(in), 1/sqrt(in))``. Image
    ``idx`` draws from its own generator seeded by ``(cfg.seed, idx)``.
    """
    shapes = _layer_shapes(cfg)
    stacked: dict[str, list[Tensor]] = {name: [] for name in shapes}
    for idx in indices:
        gen = torch.Generator().manual_seed(_model_seed(cfg.seed, int(idx)))
        for name, shape in shapes.items():
            fan_in = shapes[name.replace("bias", "weight")][1]
            if name.endswith("bias"):
                bound = 1 / math.sqrt(fan_in)
            elif name == "0.weight":
                bound = 1 / fan_in
            else:
                bound = math.sqrt(6 / fan_in) / cfg.w0
            stacked[name].append((torch.rand(shape, generator=gen) * 2 - 1) * bound)
    return {name: torch.stack(values) for name, values in stacked.items()}


def stacked_forward(params: dict[str, Tensor], coords: Tensor, w0: float) -> Tensor:
    """``M`` SIRENs at once: ``params {name: [M, *shape]}``, ``coords [P, in]`` ->
    ``[M, P, out]``; each equals ``models.siren(...)(coords)`` up to float rounding."""
    layers = len(params) // 2
    m = params["0.weight"].shape[0]
    x = coords.expand(m, *coords.shape)
    for i in range(layers):
        weight, bias = params[f"{2 * i}.weight"], params[f"{2 * i}.bias"]
        if i < layers - 1:  # sin(w0 (W x + b)): w0 scales the small W and b, not [M, P, H]
            x = torch.sin(torch.baddbmm(w0 * bias.unsqueeze(1), x, w0 * weight.transpose(1, 2)))
        else:
            x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return x


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB of images in ``[-1, 1]`` (peak-to-peak 2): ``10 log10(4 / mse)``."""
    return 10 * torch.log10(4 / mse.clamp(min=1e-30))


def fit_chunk(targets: Tensor, params: dict[str, Tensor], cfg: INRZooConfig,
              on_step: Callable[[int, Tensor], None] | None = None) -> tuple[dict, Tensor]:
    """Fit ``M`` SIRENs to their images with one Adam over the stacked parameters.

    Args:
        targets: ``[M, P, C]`` pixel values on the grid of ``coordinate_grid(image_size)``.
        params: the initialisation ``{name: [M, *shape]}`` on the targets' device.
        on_step: called as ``on_step(step, loss [M])`` every 10 steps.

    Returns:
        the fitted parameters (detached) and the final per-INR MSE ``[M]``.
    """
    coords = coordinate_grid(cfg.image_size, targets.dtype, targets.device)
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = (stacked_forward(params, coords, cfg.w0) - targets).square().mean((1, 2))
        loss.sum().backward()  # the sum's gradient is each INR's own gradient
        opt.step()
        if on_step is not None and step % 10 == 9:
            on_step(step + 1, loss.detach())
    with torch.no_grad():
        mse = (stacked_forward(params, coords, cfg.w0) - targets).square().mean((1, 2))
    return {k: v.detach() for k, v in params.items()}, mse


# ----------------------------------------------------------------------------- zoo files

def _file_name(cfg: INRZooConfig, label: int, idx: int) -> str:
    return f"{cfg.prefix}_{label}s/net{idx}.pth"


def _shard_path(root: Path, start: int, stop: int) -> Path:
    return root / "manifest" / f"chunk_{start:05d}_{stop:05d}.csv"


def _chunk_done(root: Path, start: int, stop: int, files: list[str]) -> bool:
    """A chunk is done when its manifest shard and all its files exist."""
    return _shard_path(root, start, stop).exists() and all((root / f).exists() for f in files)


def _write_chunk(root: Path, start: int, stop: int, files: list[str], labels: Tensor,
                 params: dict[str, Tensor], mse: Tensor) -> None:
    """Each INR's state_dict atomically, then (after a sync) the chunk's manifest shard."""
    params = {k: v.to("cpu", torch.float32) for k, v in params.items()}
    for j, file in enumerate(files):
        state = {k: v[j].clone() for k, v in params.items()}  # own storage, not the stack's
        atomic_torch_save(state, root / file, fsync=False)
    if hasattr(os, "sync"):
        os.sync()  # the files reach the disk before the shard that declares them done
    rows = [{"file": f, "label": int(labels[j]), "idx": start + j, "mse": f"{float(e):.6g}",
             "psnr": f"{float(p):.2f}"}
            for j, (f, e, p) in enumerate(zip(files, mse.cpu(), psnr(mse).cpu(), strict=True))]
    atomic_write_csv(_shard_path(root, start, stop), rows, MANIFEST_COLUMNS)


def _open_zoo(root: Path, cfg: INRZooConfig) -> None:
    """Check ``root/generator.json`` against ``cfg``, or write it for a new zoo."""
    spec = root / "generator.json"
    if spec.exists():
        check_identity(root, spec, cfg.identity())
        return
    if (root / LABELS_FILE).exists():
        raise ValueError(f"{root} has {LABELS_FILE} but no generator.json: not a zoo written "
                         "by this generator; use another root")
    atomic_write_json(spec, {"generator": "neuralgraph_quasi.data.generate.inr",
                             "config": cfg.identity(), "format": _FORMAT})


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _write_labels(root: Path, chunks: list[tuple[int, int]]) -> list[dict]:
    """``labels.csv`` from the chunks' shards (rewritten only if its content changes)."""
    rows = []
    for start, stop in chunks:
        with open(_shard_path(root, start, stop), newline="", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
    text = csv_text(rows, MANIFEST_COLUMNS)
    path = root / LABELS_FILE
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return rows


def _summary(rows: list[dict]) -> str:
    values = torch.tensor([float(r["psnr"]) for r in rows])
    mse = torch.tensor([float(r["mse"]) for r in rows])
    return (f"{len(rows)} INRs: PSNR median {values.median():.1f} dB, min {values.min():.1f} "
            f"dB; MSE median {mse.median():.2e}, max {mse.max():.2e}")


def generate(cfg: INRZooConfig | Mapping | None = None, **overrides) -> Path:
    """Generate (or resume, or confirm) the INR zoo described by ``cfg``; return its root.

    ``cfg`` is an :class:`INRZooConfig`, a mapping of its keys (a hydra ``DictConfig``
    works) or ``None`` for the defaults; ``overrides`` replace keys.

    INRs are fitted in chunks of ``models_per_chunk`` images. A chunk writes its
    ``.pth`` files (each atomically), then its manifest shard; it is done when the shard
    and all its files exist. On restart, done chunks are skipped and the others fitted
    again from scratch (same seed, same files). ``labels.csv`` is assembled from the
    shards at the end. A complete zoo is left untouched; a different config (other than
    ``root``, ``device``, ``num_threads``, ``progress``) in an existing root raises
    ``ValueError`` naming the differing keys.
    """
    cfg = INRZooConfig.from_any(cfg, **overrides)
    root = Path(cfg.root)
    _open_zoo(root, cfg)
    images, labels = load_digits(cfg.image_size)
    images, labels = images[:cfg.num_models], labels[:cfg.num_models]
    size = cfg.models_per_chunk
    chunks = [(s, min(s + size, cfg.num_models)) for s in range(0, cfg.num_models, size)]
    files = [_file_name(cfg, int(labels[i]), i) for i in range(cfg.num_models)]
    todo = [(s, e) for s, e in chunks if not _chunk_done(root, s, e, files[s:e])]
    if not todo:
        rows = _write_labels(root, chunks)
        print(f"INR zoo at {root} is complete ({_summary(rows)}): nothing to do")
        return root

    device = _resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        _fit_chunks(root, cfg, todo, images, labels, files, device)
    finally:
        torch.set_num_threads(threads)
    rows = _write_labels(root, chunks)
    print(f"INR zoo at {root}: {_summary(rows)}")
    return root


def _fit_chunks(root: Path, cfg: INRZooConfig, todo: list[tuple[int, int]], images: Tensor,
                labels: Tensor, files: list[str], device: torch.device) -> None:
    """Fit and write the chunks ``todo`` (``(start, stop)`` image ranges)."""
    done = cfg.num_models - sum(e - s for s, e in todo)
    with tqdm(total=cfg.num_models, initial=done, unit="INR", desc="INR zoo",
              disable=not cfg.progress, smoothing=0.0) as bar:
        for start, stop in todo:
            targets = (images[start:stop] * 2 - 1).flatten(2).transpose(1, 2).to(device)
            init = {k: v.to(device) for k, v in init_params(range(start, stop), cfg).items()}

            def report(step: int, loss: Tensor, start: int = start) -> None:
                bar.set_postfix(chunk=start, step=step, mse=f"{float(loss.median()):.1e}")

            params, mse = fit_chunk(targets, init, cfg, report)
            _write_chunk(root, start, stop, files[start:stop], labels[start:stop], params, mse)
            bar.update(stop - start)
