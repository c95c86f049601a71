"""Predict the accuracy of your own network (or edit it) with a trained run.

    python scripts/predict.py run=outputs/train/agnews_tf/<run> model=my_model.pt
    python scripts/predict.py run=<edit run> model=my_siren.pt out=edited.pt

``model`` is a file holding a whole module (``torch.save(module, path)``), read with
``weights_only=False``: only open files you trust. It must be convertible by
``neuralgraph_quasi.to_graph`` and of an architecture the run was trained on.
"""

from __future__ import annotations

import argparse
import sys

import torch

from neuralgraph_quasi.train import load_run


def _parse(argv: list[str]) -> argparse.Namespace:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(args) - {"run", "model", "out", "checkpoint", "device"}
    if unknown or "run" not in args or "model" not in args:
        sys.exit("usage: predict.py run=RUN_DIR model=FILE [out=FILE] [checkpoint=best.ckpt]"
                 " [device=cpu]")
    return argparse.Namespace(checkpoint="best.ckpt", device="cpu", out=None, **args)


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    predictor = load_run(args.run, args.checkpoint, args.device)
    module = torch.load(args.model, map_location="cpu", weights_only=False)
    if isinstance(module, dict):
        sys.exit(f"{args.model} holds a state_dict; save the whole module "
                 "(torch.save(model, path)) so its architecture is known")
    if predictor.task == "edit":
        edited = predictor.edit(module)
        out = args.out or "edited.pt"
        torch.save(edited, out)
        print(f"edited network written to {out}")
    elif predictor.task == "classify":
        probs = predictor.predict(module)
        print(f"class {int(probs.argmax())} (probabilities {probs.tolist()})")
    else:
        print(f"predicted accuracy: {predictor.predict(module):.4f}")


if __name__ == "__main__":
    main()
