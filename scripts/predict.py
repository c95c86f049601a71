"""Predict the accuracy of your own network (or edit it) with a trained run.

    python scripts/predict.py run=outputs/train/agnews_tf/<run> model=my_model.pt
    python scripts/predict.py run=<run> model=my_model.pt checkpoint=last.ckpt device=cuda \\
        out=prediction.json
    python scripts/predict.py run=<edit run> model=my_siren.pt out=edited.pt

``model`` is a file holding a whole module (``torch.save(module, path)``), read with
``weights_only=False``: only open files you trust. It must be convertible by
``neuralgraph_quasi.to_graph`` and of an architecture the run was trained on (the run's
checkpoint records its zoo's architectures; another one is refused, naming what differs).

Options: ``checkpoint=`` (file in the run directory, default ``best.ckpt``), ``device=``
(default ``cpu``), ``out=`` (prediction runs: also write the prediction as JSON there;
editing runs: where the edited module goes, default ``edited.pt``). Files are written
atomically and never over ``model``. Any failure prints one line on stderr and exits
with status 2.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from neuralgraph_quasi import ConversionError
from neuralgraph_quasi.data._atomic import atomic_torch_save, atomic_write_json
from neuralgraph_quasi.train import ArchitectureError, CheckpointError, load_run

EXIT_ERROR = 2
OPTIONS = {"run": None, "model": None, "out": None, "checkpoint": "best.ckpt", "device": "cpu"}
USAGE = ("usage: predict.py run=RUN_DIR model=FILE [out=FILE] [checkpoint=best.ckpt] "
         "[device=cpu]")


class CliError(Exception):
    """A failure to report as one line on stderr."""


def _parse(argv: list[str]) -> dict[str, str]:
    args = dict(OPTIONS)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise CliError(f"unknown argument {item!r}; {USAGE}")
        args[key] = value
    missing = [k for k in ("run", "model") if not args[k]]
    if missing:
        raise CliError(f"missing {' and '.join(k + '=' for k in missing)}; {USAGE}")
    return args


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_module(path: Path) -> nn.Module:
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
            AttributeError, ImportError, ModuleNotFoundError) as e:
        raise CliError(f"{path}: not a readable torch file (corrupt, truncated, or a module "
                       f"whose class cannot be imported here): {type(e).__name__}: "
                       f"{_first_line(e)}") from None
    if isinstance(obj, dict):
        raise CliError(f"{path} holds a state_dict; save the whole module "
                       "(torch.save(model, path)) so its architecture is known")
    if not isinstance(obj, nn.Module):
        raise CliError(f"{path} holds a {type(obj).__name__}, not a torch module")
    return obj


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def run(args: dict[str, str]) -> str:
    """Predict (or edit) as ``args`` say; returns what to print."""
    model_path = Path(args["model"])
    out = Path(args["out"]) if args["out"] else None
    if out is not None and _same_file(out, model_path):
        raise CliError(f"out={out} is the input model: choose another file")
    if out is not None and out.is_dir():
        raise CliError(f"out={out} is a directory: give a file name")
    predictor = load_run(args["run"], args["checkpoint"], args["device"])
    module = _load_module(model_path)
    if predictor.task == "edit":
        edited = predictor.edit(module)
        out = out or Path("edited.pt")
        atomic_torch_save(edited, out)
        return f"edited network written to {out}"
    if predictor.task == "classify":
        probs = predictor.predict(module)
        record = {"class": int(probs.argmax()), "probabilities": probs.tolist()}
        text = f"class {record['class']} (probabilities {record['probabilities']})"
    else:
        record = {"predicted_accuracy": float(predictor.predict(module))}
        text = f"predicted accuracy: {record['predicted_accuracy']:.4f}"
    if out is not None:
        atomic_write_json(out, {**record, "run": str(args["run"]), "model": str(model_path),
                                "checkpoint": args["checkpoint"]})
        text += f" (written to {out})"
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(_parse(sys.argv[1:] if argv is None else argv)))
    except (CliError, CheckpointError, ArchitectureError, ConversionError, ValueError,
            OSError) as e:
        print(f"predict.py: error: {_first_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
