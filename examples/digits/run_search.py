"""Auto-quantize the digits CNN within an accuracy budget and print the result.

Usage::

    python examples/digits/run_search.py                 # int8, at most 1 point of accuracy
    python examples/digits/run_search.py --bits 4        # int4 weights and activations
    python examples/digits/run_search.py --max-loss 0.005 --output-dir /tmp/search

Trains the model first if ``examples/digits/out/digits_cnn.pt`` is missing. The validation
loader serves both as the evaluation set and, through its first batches, as calibration data.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import autoquant as aq
from autoquant.evaluators import ClassificationEvaluator
from examples.digits.model import make_loaders
from examples.digits.train import get_trained_model

__all__ = ["main", "parse_args"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "out" / "search"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-loss",
        type=float,
        default=0.01,
        help="largest accepted drop in val accuracy, absolute (default: 0.01 = 1 point)",
    )
    parser.add_argument(
        "--bits", type=int, default=8, help="bits for weights and activations (default: 8)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where the result is saved (default: {DEFAULT_OUTPUT})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the search with the parsed options, print its summary and save the result."""
    args = parse_args(argv)
    model = get_trained_model()
    _, val_loader = make_loaders(batch_size=64)
    evaluator = ClassificationEvaluator(val_loader, calibration_batches=4)
    example_input = val_loader[0][0]

    config = None
    if args.bits != 8:
        bits = {"bits": args.bits}
        config = aq.QuantConfig.from_dict({"default": {"weight": bits, "activation": bits}})

    result = aq.auto_quantize(
        model,
        evaluator,
        example_inputs=(example_input,),
        max_loss=args.max_loss,
        loss_type="absolute",
        strategy="binary",
        sensitivity="cosine",
        config=config,
    )
    print(result.summary())
    result.save(str(args.output_dir))
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
