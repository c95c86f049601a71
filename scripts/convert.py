"""Convert a saved torch model to a NeuralGraph file.

    python scripts/convert.py MODEL_FILE --out GRAPH_FILE [--draw PNG]
    python scripts/convert.py net.pt --out net.graph.pt --trust-pickle        # torch.save(model)
    python scripts/convert.py state.pt --out g.pt \\
        --arch neuralgraph_quasi.models.TransformerClassifier --arch-kwargs '{"dim": 32}'
    python scripts/convert.py state.pt --out g.pt --arch my_package.nets:make_resnet \\
        --example-shape 1,3,32,32

MODEL_FILE holds either a state_dict (loaded with ``weights_only=True``; give the
architecture with ``--arch``) or a whole pickled module (``torch.save(model)``), which
loads only with ``--trust-pickle`` because unpickling runs code from the file. The graph
is written with ``torch.save`` and loads back with ``torch.load(path, weights_only=True)``
once ``neuralgraph_quasi`` is imported (it registers the graph classes as safe to load).
Outputs are written atomically (temporary file, then rename) and never over MODEL_FILE or
each other (``--out`` and ``--draw`` must differ; ``--draw``'s extension names a format
matplotlib writes). Any failure prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from neuralgraph_quasi import ConversionError, draw, to_graph
from neuralgraph_quasi.data._atomic import atomic_torch_save

EXIT_ERROR = 2


class CliError(Exception):
    """A failure to report as one line on stderr."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py",
                                description="Convert a saved torch model to a NeuralGraph file.")
    p.add_argument("model_file", metavar="MODEL_FILE", type=Path,
                   help="a state_dict (with --arch) or a whole pickled module (--trust-pickle)")
    p.add_argument("--out", required=True, type=Path, metavar="GRAPH_FILE",
                   help="where to write the graph (torch.save)")
    p.add_argument("--draw", type=Path, metavar="PNG", help="also draw the graph to this PNG")
    p.add_argument("--arch", metavar="NAME",
                   help="architecture for a state_dict: 'package.module.Class' or "
                        "'package.module:factory'")
    p.add_argument("--arch-kwargs", default="{}", metavar="JSON",
                   help="keyword arguments for --arch, as a JSON object")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled module (this executes code from the file)")
    p.add_argument("--example-shape", metavar="D0,D1,...",
                   help="shape of an example input for traced models (token axes, flattened "
                        "feature maps)")
    p.add_argument("--example-dtype", default="float32", choices=("float32", "float64", "long"),
                   help="dtype of the example input ('long': token ids, all zero)")
    return p


def _load(path: Path, trust_pickle: bool):
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # a damaged file, not a class to unpickle
            raise CliError(f"{path}: not a readable torch file (corrupt or truncated?): "
                           f"{_first_line(e)}") from None
        if not trust_pickle:
            raise CliError(f"{path} holds pickled Python objects (a whole module?); loading them "
                           "executes code from the file, so pass --trust-pickle only if you "
                           "trust its source, or save a state_dict and use --arch") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CliError(f"{path}: not a readable torch file (corrupt or truncated?): "
                       f"{type(e).__name__}: {_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"{path}: cannot unpickle: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _architecture(name: str, kwargs_json: str) -> nn.Module:
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as e:
        raise CliError(f"--arch-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise CliError("--arch-kwargs must be a JSON object")
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise CliError(f"--arch {name!r}: expected 'package.module.Class' or "
                       "'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CliError(f"--arch {name!r}: {e}") from None
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - user code
        raise CliError(f"--arch {name!r} with {kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"--arch {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _state_dict(obj: Mapping) -> Mapping:
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _model(args) -> nn.Module:
    obj = _load(args.model_file, args.trust_pickle)
    if isinstance(obj, nn.Module):
        if args.arch:
            raise CliError(f"{args.model_file} holds a whole module; --arch is for state_dicts")
        return obj
    if not isinstance(obj, Mapping):
        raise CliError(f"{args.model_file} holds a {type(obj).__name__}, neither a module nor a "
                       "state_dict")
    if not args.arch:
        raise CliError(f"{args.model_file} holds a state_dict: name its architecture with --arch")
    state = _state_dict(obj)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"{args.model_file}: the state_dict holds values that are not tensors")
    model = _architecture(args.arch, args.arch_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CliError(f"{args.model_file} does not fit {args.arch}: "
                       f"{' '.join(details) or _first_line(e)}") from None
    return model


def _example(args):
    if not args.example_shape:
        return None
    try:
        shape = [int(v) for v in args.example_shape.split(",")]
    except ValueError:
        raise CliError(f"--example-shape {args.example_shape!r}: expected integers like "
                       "1,3,32,32") from None
    if args.example_dtype == "long":
        return torch.zeros(shape, dtype=torch.long)
    return torch.randn(shape, dtype=getattr(torch, args.example_dtype))


def _image_formats() -> set[str]:
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def _check_outputs(args) -> None:
    """Refuse, before any work, outputs that would destroy the input or each other."""
    source = args.model_file.resolve()
    outputs = [("--out", args.out)] + ([("--draw", args.draw)] if args.draw else [])
    for flag, path in outputs:
        if path.resolve() == source:
            raise CliError(f"{flag} {path} is the input MODEL_FILE: choose another file")
        if path.is_dir():
            raise CliError(f"{flag} {path} is a directory: give a file name")
    if args.draw is not None:
        if args.draw.resolve() == args.out.resolve():
            raise CliError(f"--out and --draw are the same file ({args.out}): the picture "
                           "would replace the graph")
        fmt = args.draw.suffix.lstrip(".").lower()
        formats = _image_formats()
        if fmt not in formats:
            raise CliError(f"--draw {args.draw}: unknown image format {fmt!r} (use one of "
                           f"{', '.join(sorted(formats))})")


def _draw_atomically(graph, path: Path, title: str) -> None:
    """Draw to a temporary file beside ``path`` (same suffix, so the same format), then
    rename it over ``path``: an interrupted or failed drawing leaves ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        draw(graph, tmp, title=title)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args) -> str:
    """Convert as ``args`` say; returns a one-line summary."""
    _check_outputs(args)
    model = _model(args).eval()
    example = _example(args)
    if example is not None and torch.is_floating_point(example):
        params = [p for p in model.parameters() if torch.is_floating_point(p)]
        example = example.to(params[0].dtype) if params else example
    try:
        graph = to_graph(model, example_input=example)
    except ConversionError as e:
        raise CliError(f"cannot convert {type(model).__qualname__}: {e}") from None
    try:
        atomic_torch_save(graph, args.out)
        if args.draw is not None:
            _draw_atomically(graph, args.draw, type(model).__qualname__)
    except OSError as e:
        raise CliError(f"cannot write: {e}") from None
    return (f"{args.model_file} -> {args.out}: {graph.num_nodes} nodes, "
            f"{graph.edge_index.size(1)} edges, {len(graph.params)} tensors")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except CliError as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
