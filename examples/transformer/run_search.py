"""Auto-quantize the digits transformer within an accuracy budget.

Usage::

    python examples/transformer/run_search.py                  # int8, at most 1 point lost
    python examples/transformer/run_search.py --bits 4 --max-loss 0.02

Trains the model first if ``examples/transformer/out/digits_transformer.pt`` is missing.
Units searched: the token embedding, the position table (weight-only), block 0's
`nn.MultiheadAttention` (projections and both matmuls), block 1's q/k/v and output
projections and its two `QuantMatMul` matmuls, both MLPs and the head.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

import autoquant as aq
from autoquant.evaluators import ClassificationEvaluator
from examples.digits.model import make_loaders
from examples.transformer.train import get_trained_model

__all__ = ["main", "parse_args", "search"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "out" / "search"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loss", type=float, default=0.01,
                        help="largest accepted absolute drop in val accuracy (default 0.01)")
    parser.add_argument("--bits", type=int, default=8, help="weight and activation bits")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest for this small model)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def search(model: nn.Module, val_loader: Any, max_loss: float = 0.01,
           bits: int = 8) -> aq.SearchResult:
    """Search `model` on `val_loader` (its first 4 batches calibrate)."""
    config = aq.QuantConfig.from_dict(
        {"default": {"weight": {"bits": bits}, "activation": {"bits": bits}}})
    evaluator = ClassificationEvaluator(val_loader, calibration_batches=4)
    return aq.auto_quantize(model, evaluator, (val_loader[0][0],), max_loss=max_loss,
                            loss_type="absolute", config=config)


def main(argv: list[str] | None = None) -> None:
    """Search, print the summary and sizes, save the result."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = get_trained_model()
    _, val_loader = make_loaders(batch_size=64)
    result = search(model, val_loader, args.max_loss, args.bits)
    print(result.summary())
    sizes = result.to_report()["sizes"]
    print(f"weights: {sizes['float_weight_bytes'] / 1e3:.1f} kB float -> "
          f"{sizes['quantized_weight_bytes'] / 1e3:.1f} kB quantized")
    result.save(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
