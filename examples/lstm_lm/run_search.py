"""Auto-quantize the character LSTM language model within a perplexity budget.

Usage::

    python examples/lstm_lm/run_search.py                      # int8, at most +1% perplexity
    python examples/lstm_lm/run_search.py --bits 4 --max-loss 0.05
    python examples/lstm_lm/run_search.py --lstm-mode dynamic  # like torch's dynamic LSTM

Trains the model first if ``examples/lstm_lm/out/char_lstm.pt`` is missing. The validation
split serves as evaluation data and, through its first two batches, as calibration data;
the final plan is re-checked on the held-out test split.
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
from examples.lstm_lm.data import example_inputs
from examples.lstm_lm.evaluator import StdlibTextPerplexity
from examples.lstm_lm.train import get_trained_model

__all__ = ["main", "make_config", "parse_args", "search"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "out" / "search"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loss", type=float, default=0.01,
                        help="largest accepted relative perplexity increase (default 0.01)")
    parser.add_argument("--bits", type=int, default=8, help="weight bits (default 8)")
    parser.add_argument("--act-bits", type=int, default=8, help="activation bits (default 8)")
    parser.add_argument("--lstm-mode", choices=["static", "dynamic", "weight_only"],
                        default="static", help="activation mode of the LSTM layers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest for this small model)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def make_config(bits: int = 8, act_bits: int = 8, lstm_mode: str = "static") -> aq.QuantConfig:
    """The quant config: `bits` weights everywhere, the LSTMs in `lstm_mode`."""
    return aq.QuantConfig.from_dict({
        "default": {"weight": {"bits": bits}, "activation": {"bits": act_bits}},
        "layers": {name: {"mode": lstm_mode} for name in ("lstm1", "lstm2")},
    })


def search(model: nn.Module, evaluator: Any, max_loss: float = 0.01,
           config: aq.QuantConfig | None = None) -> aq.SearchResult:
    """Run the search with a relative perplexity budget."""
    return aq.auto_quantize(model, evaluator, example_inputs(), max_loss=max_loss,
                            loss_type="relative", config=config or make_config())


def main(argv: list[str] | None = None) -> None:
    """Search, print the summary, sizes and the held-out check, save the result."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = get_trained_model()
    result = search(model, StdlibTextPerplexity("val"), args.max_loss,
                    make_config(args.bits, args.act_bits, args.lstm_mode))
    print(result.summary())
    sizes = result.to_report()["sizes"]
    print(f"weights: {sizes['float_weight_bytes'] / 1e3:.1f} kB float -> "
          f"{sizes['quantized_weight_bytes'] / 1e3:.1f} kB quantized")
    test = StdlibTextPerplexity("test")
    print(f"test perplexity: float {test.evaluate(model):.4f}, "
          f"quantized {test.evaluate(result.model):.4f}")
    result.save(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
