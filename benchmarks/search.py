"""Benchmark of the end-to-end search: evaluations, compression, time and memory.

Prints, for the digits example and a synthetic model with 100+ quantizable layers:
N, evaluations spent vs the ceil(log2(N+1))+2 bound, layers quantized k/N, loss vs budget,
wall time and the share spent inside the evaluator, and the sensitivity pass's time and
peak memory as ratios to one plain float forward pass over the same calibration batches.

Peak memory on CPU is the growth of the process's peak RSS (VmHWM, reset just before the
pass) over its RSS before the pass, each pass measured in a fresh subprocess; on CUDA it is
``torch.cuda.max_memory_allocated`` over the memory allocated before the pass.

Usage::

    python benchmarks/search.py [--device cpu|cuda] [--layers 120] [--width 256]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import autoquant as aq  # noqa: E402
from autoquant.evaluation.adapter import calibration_of  # noqa: E402
from autoquant.evaluators import ClassificationEvaluator, Evaluator, FidelityEvaluator  # noqa: E402
from autoquant.quant.layers import QuantState  # noqa: E402
from autoquant.quant.qmodel import QuantModel  # noqa: E402
from autoquant.sensitivity.gradient import compute_gradient_sensitivity  # noqa: E402
from autoquant.sensitivity.ranking import compute_sensitivity  # noqa: E402


class DeepResidualMLP(nn.Module):
    """`depth` residual blocks Linear-ReLU with LayerNorm: `depth` + 2 Linear layers."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Linear(32, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h) * 0.2
        return self.head(h)


def synthetic(depth: int, width: int, device: str) -> tuple[nn.Module, Evaluator, tuple]:
    torch.manual_seed(0)
    model = DeepResidualMLP(depth, width).eval().to(device)
    with torch.no_grad():  # a few layers with outlier weights: the search has work to do
        for i in range(0, depth, max(1, depth // 6)):
            model.blocks[i][1].weight[:, :2] *= 40
    inputs = [torch.randn(1024, 32, device=device) for _ in range(8)]
    return model, FidelityEvaluator(model, inputs, calibration_inputs=inputs[:4]), (inputs[0],)


def digits(device: str) -> tuple[nn.Module, Evaluator, tuple]:
    from examples.digits.model import make_loaders
    from examples.digits.train import get_trained_model

    model = get_trained_model().to(device)
    _, val = make_loaders(batch_size=64)
    return model, ClassificationEvaluator(val, calibration_batches=4, device=device), \
        (val[0][0].to(device),)


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, Evaluator, tuple]:
    if name == "digits":
        return digits(args.device)
    return synthetic(args.layers, args.width, args.device)


# -- the sensitivity pass vs a float pass, measured in a subprocess each -------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the pass's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_pass(name: str, which: str, args: argparse.Namespace) -> tuple[float, int, int]:
    """(seconds, peak bytes, peak bytes above the pre-pass level) of one pass: 'float'
    forward, 'sensitivity' (the layer scope) or 'gradient' (the gradient scope, the
    default ranking). The peak includes the model, the data and the process."""
    model, evaluator, inputs = build(name, args)
    qmodel = QuantModel(model, aq.QuantConfig(), inputs)
    qmodel.calibrate(calibration_of(evaluator))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        _reset_peak_rss()
    start = time.perf_counter()
    if which == "float":
        with qmodel.state(QuantState.FLOAT), torch.no_grad():
            evaluator.calibration(qmodel.model)
    elif which == "gradient":
        compute_gradient_sensitivity(qmodel, calibration_of(evaluator), "cosine")
    else:
        compute_sensitivity(qmodel, calibration_of(evaluator), "cosine")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return seconds, peak, max(peak - base, 0)


# Fixed malloc thresholds: large tensors are mmap'd and returned on free, so the peak RSS
# follows live tensors instead of glibc's arena caching (its dynamic mmap threshold).
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
               "MALLOC_TRIM_THRESHOLD_": "131072"}


def pass_ratios(name: str, args: argparse.Namespace, which_pass: str = "sensitivity"
                ) -> tuple[float, float, float]:
    """A ranking pass (`which_pass`) vs the float pass: time ratio, peak ratio,
    peak-above-start ratio."""
    out = {}
    for which in ("float", which_pass):
        best_t, peak, extra = math.inf, 0, 0
        for _ in range(3):
            cmd = [sys.executable, __file__, "--measure", name, which, "--device", args.device,
                   "--layers", str(args.layers), "--width", str(args.width)]
            text = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env=MEASURE_ENV).stdout
            seconds, total, above = text.split()
            best_t = min(best_t, float(seconds))
            peak, extra = max(peak, int(total)), max(extra, int(above))
        out[which] = (best_t, peak, extra)
    (tf, pf, ef), (ts, ps, es) = out["float"], out[which_pass]
    return ts / tf, ps / pf, (es / ef if ef else float("nan"))


def run_search(name: str, args: argparse.Namespace) -> dict:
    model, evaluator, inputs = build(name, args)
    max_loss = {"digits": 0.005, "synthetic": 0.0025}[name]
    config = {"default": {"weight": {"bits": 4}, "activation": {"bits": 4}}} \
        if name == "digits" else {"default": {"weight": {"bits": 4}}}
    start = time.perf_counter()
    result = aq.auto_quantize(model, evaluator, inputs, max_loss=max_loss, config=config)
    wall = time.perf_counter() - start
    n = len(result.quantized_layers) + len(result.fallback_layers)
    overhead = wall - result.timings["evaluator"] - result.timings["calibration"] \
        - result.timings["sensitivity"]
    return {
        "model": name, "N": n, "evals": result.num_evaluations,
        "bound": math.ceil(math.log2(n + 1)) + 2,
        "k/N": f"{len(result.quantized_layers)}/{n}", "status": result.status,
        "loss": f"{result.loss:.5f}/{max_loss}", "wall_s": f"{wall:.2f}",
        "in_eval": f"{result.timings['evaluator'] / wall:.0%}",
        "overhead": f"{overhead / wall:.1%}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=120, help="synthetic model depth")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.measure:
        print(*measure_pass(args.measure[0], args.measure[1], args))
        return
    rows = []
    for name in ("digits", "synthetic"):
        row = run_search(name, args)
        row["sens_time_x"], row["sens_peak_x"], row["sens_extra_x"] = (
            f"{v:.2f}" for v in pass_ratios(name, args))
        row["grad_time_x"], row["grad_peak_x"], row["grad_extra_x"] = (
            f"{v:.2f}" for v in pass_ratios(name, args, "gradient"))
        rows.append(row)
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-|-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r[k]).ljust(widths[k]) for k in keys))
    print("\nin_eval: share of wall time inside Evaluator.evaluate; overhead: wall time outside "
          "evaluate, calibration and the sensitivity pass; sens_time_x / sens_peak_x: the "
          "layer-scope sensitivity pass's time / peak memory (model and process included) "
          "vs one float forward pass over the same calibration batches; sens_extra_x: the "
          "same for the memory the pass adds above its starting level; grad_*: the same "
          "for the gradient-scope pass (the default ranking).")


if __name__ == "__main__":
    main()
