"""Benchmarks of neuralgraph_quasi: a readable table and a JSON record.

Each section is a function registered in :data:`SECTIONS` that returns result
rows; run a subset with ``--sections NAME ...``. Timings are the median of
several repeats (``time.perf_counter``) after a warm-up call, with the cyclic
garbage collector run before each repeat.

    python scripts/benchmark.py                  # all sections, full sizes
    python scripts/benchmark.py --quick          # smoke run
    python scripts/benchmark.py --sections conversion --out outputs/conv.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuralgraph_quasi as nq
from neuralgraph_quasi.models import TransformerClassifier

Row = dict[str, Any]
Section = Callable[[argparse.Namespace], list[Row]]

#: Sections in the order they run; add one with the :func:`section` decorator.
SECTIONS: dict[str, Section] = {}

#: Bulk conversion of 10,000 CNN-zoo models must take less than this on one core.
BULK_CNN_TARGET_S = 5.0


def section(name: str) -> Callable[[Section], Section]:
    """Register a benchmark section under ``name``."""

    def register(fn: Section) -> Section:
        SECTIONS[name] = fn
        return fn

    return register


# -- timing ---------------------------------------------------------------------
def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    The result of each call is released after its clock stops, so freeing it
    is not timed.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    return times


def throughput(section_name: str, name: str, fn: Callable[[], object], models: int,
               repeats: int, **extra: Any) -> Row:
    """A result row for ``fn``, which processes ``models`` models per call."""
    times = timed(fn, repeats)
    median = statistics.median(times)
    return {"section": section_name, "name": name, "models": models, "seconds": median,
            "models_per_s": models / median, "repeats": repeats, "times": times, **extra}


# -- models -----------------------------------------------------------------------
def cnn_zoo_model() -> nn.Sequential:
    """The CNN-zoo architecture: 3x Conv2d(16, 3x3, stride 2) + ReLU, pool, Linear(16, 10).

    4,970 parameters for one input channel.
    """
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(3):
        layers += [nn.Conv2d(channels, 16, 3, stride=2), nn.ReLU()]
        channels = 16
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def stacked_states(like: nn.Module, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A zoo of ``count`` random models of ``like``'s architecture, as ``{name: [M, *shape]}``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(count, *value.shape, generator=gen, dtype=value.dtype)
            for name, value in like.state_dict().items()}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- sections ---------------------------------------------------------------------
@section("conversion")
def conversion(args: argparse.Namespace) -> list[Row]:
    """Network <-> graph conversion: single models, bulk zoos, and back to modules."""
    quick = args.quick
    repeats = 3 if quick else 5
    singles = 20 if quick else 200
    cnn = cnn_zoo_model()
    transformer = TransformerClassifier(depth=1)
    zoo_transformer = TransformerClassifier()
    cnn_graph = nq.to_graph(cnn)
    rows = []

    def row(name: str, fn: Callable[[], object], models: int, model: nn.Module,
            **extra: Any) -> None:
        rows.append(throughput("conversion", name, fn, models, repeats,
                               params=num_params(model), **extra))

    row("to_graph CNN-zoo", lambda: [nq.to_graph(cnn) for _ in range(singles)], singles, cnn)
    row("to_graph Transformer depth=1",
        lambda: [nq.to_graph(transformer) for _ in range(singles)], singles, transformer)
    bulk = (("to_graphs CNN-zoo", cnn, 1_000 if quick else 10_000),
            ("to_graphs Transformer", zoo_transformer, 100 if quick else 1_000))
    for name, like, count in bulk:
        states = stacked_states(like, count)
        target = {"target_s": BULK_CNN_TARGET_S} if like is cnn and not quick else {}
        row(f"{name} x{count:,}", lambda like=like, states=states: nq.to_graphs(like, states),
            count, like, **target)
        del states
    row("to_model CNN-zoo", lambda: [nq.to_model(cnn_graph, cnn) for _ in range(singles)],
        singles, cnn)
    return rows


ZOO_MEMORY_TARGET_GB = 4.0

_PEAK_RSS_CHILD = """
import resource, sys, time
from neuralgraph_quasi.data import SmallTransformerZoo
start = time.perf_counter()
data = SmallTransformerZoo(sys.argv[1], split="all", log=False)
graphs = [data[i] for i in range(0, len(data), max(1, len(data) // 64))]
seconds = time.perf_counter() - start
print(len(data), seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_fake_transformer_zoo(root: Path, count: int, chunk: int = 1000) -> None:
    """``count`` random AGNews-architecture checkpoints (epoch 75) in the published layout."""
    (root / "ag_news").mkdir(parents=True)
    (root / "metadata").mkdir()
    like = TransformerClassifier()
    rows = ["ckpt_epoch,ckpt_file,test_accuracy"]
    for start in range(0, count, chunk):
        states = stacked_states(like, min(chunk, count - start), seed=start)
        for i in range(min(chunk, count - start)):
            name = f"ag_news/run{start + i}_75_5000.pt"
            torch.save({k: v[i].clone() for k, v in states.items()}, root / name)
            rows.append(f"75,{name},0.5")
    (root / "metadata" / "ag_news.csv").write_text("\n".join(rows) + "\n")


@section("zoo_memory")
def zoo_memory(args: argparse.Namespace) -> list[Row]:
    """Peak RSS of processing, then of loading from the cache, the epoch-75 AGNews zoo
    (16,000 members of ~18,000 edges; random weights in the published layout), each in a
    fresh process."""
    count = 500 if args.quick else 16_000
    root = Path(tempfile.mkdtemp(prefix="ngq-zoo-"))
    rows = []
    try:
        write_fake_transformer_zoo(root, count)
        for stage in ("process", "load from cache"):
            out = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(root)],
                                 check=True, capture_output=True, text=True).stdout.split()
            members, seconds, peak_kb = int(out[0]), float(out[1]), int(out[2])
            peak_gb = peak_kb / 2**20
            rows.append({"section": "zoo_memory", "name": f"AGNews zoo {stage}",
                         "models": members, "seconds": seconds, "models_per_s": members / seconds,
                         "peak_rss_gb": peak_gb,
                         "note": f"peak RSS {peak_gb:.2f} GB (target < {ZOO_MEMORY_TARGET_GB:g}: "
                                 f"{'met' if peak_gb < ZOO_MEMORY_TARGET_GB else 'MISSED'})"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


#: The AGNews generator's target: its default 1,000-model zoo in under this many seconds on
#: the 2-core CPU (checked here by extrapolating the measured models/s, not by a full run).
AGNEWS_1000_TARGET_S = 300.0


@section("zoo_generation")
def zoo_generation(args: argparse.Namespace) -> list[Row]:
    """Models/s of the transformer zoo generators with their defaults (CPU, threaded chunks),
    each writing a fresh zoo of 64 runs (16 with --quick) into a temporary directory; chunks
    are shrunk to keep every core busy. One timed run each (minutes of training)."""
    from neuralgraph_quasi.data.generate import agnews, mnist

    count = 16 if args.quick else 64
    workers = max(1, os.cpu_count() or 1)
    rows = []
    for name, generate, config in (("AGNews generator", agnews.generate, agnews.AGNewsZooConfig),
                                   ("MNIST generator", mnist.generate, mnist.MNISTZooConfig)):
        # the default chunk size, or smaller so that every worker has a chunk (a full-size
        # zoo has many chunks; one 64-model chunk would leave the other cores idle)
        chunk = min(config().models_per_chunk, -(-count // workers))
        root = Path(tempfile.mkdtemp(prefix="ngq-gen-"))
        try:
            start = time.perf_counter()
            generate(root=str(root / "zoo"), num_models=count, progress=False, device="cpu",
                     workers=workers, models_per_chunk=chunk)
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(root, ignore_errors=True)
        row = {"section": "zoo_generation", "name": f"{name} x{count} (defaults)",
               "models": count, "seconds": seconds, "models_per_s": count / seconds,
               "repeats": 1, "workers": workers, "models_per_chunk": chunk}
        if generate is agnews.generate:
            estimate = 1000 / row["models_per_s"]
            verdict = "met" if estimate < AGNEWS_1000_TARGET_S else "MISSED"
            row["extrapolated_1000_s"] = estimate
            row["note"] = (f"EXTRAPOLATED 1,000 models: {estimate:.0f} s (target < "
                           f"{AGNEWS_1000_TARGET_S:g} s on the 2-core CPU: {verdict})")
        rows.append(row)
    return rows


# -- reporting --------------------------------------------------------------------
def environment(threads: int) -> dict[str, Any]:
    """Versions, hardware and the git commit the numbers belong to."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "neuralgraph_quasi": nq.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": {
            "processor": platform.processor() or None,
            "model": cpu_model(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def cpu_model() -> str | None:
    """The CPU model name (Linux ``/proc/cpuinfo``), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = ("section", "benchmark", "models", "median s", "models/s", "note")
    lines = []
    for r in rows:
        note = r.get("note", "")
        if "target_s" in r:
            verdict = "met" if r["seconds"] < r["target_s"] else "MISSED"
            note = f"target < {r['target_s']:g} s: {verdict}"
        lines.append((r["section"], r["name"], f"{r['models']:,}", f"{r['seconds']:.4f}",
                      f"{r['models_per_s']:,.1f}", note))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    numeric = {2, 3, 4}

    def fmt(cells) -> str:
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and fewer repeats, for a smoke run")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        metavar="NAME", help=f"sections to run (default: all of {list(SECTIONS)})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"),
                        help="JSON output path (default: outputs/benchmark.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in SECTIONS:  # registry order, whatever order they were asked in
        if name in args.sections:
            print(f"running {name} ...", flush=True)
            rows += SECTIONS[name](args)
    print(table(rows))
    record = {"environment": environment(torch.get_num_threads()), "quick": args.quick,
              "sections": [s for s in SECTIONS if s in args.sections], "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
