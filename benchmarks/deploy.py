"""Deployment benchmark: what a user ships, measured in onnxruntime with default session
options on this CPU.

For each model the search runs with its own metric and ``verify_deploy=True`` (the chosen
plan is exported and scored by the same evaluator in onnxruntime before the search says
"met"); then the result is exported with `SearchResult.export_onnx` and the float model
with `autoquant.export.onnx_export.export_float_onnx`, and the benchmark prints:

- latency: INT8 / float in onnxruntime, both sessions with default options and the same
  threads, timed interleaved (A B A B ...) on the same batch; the medians and their ratio;
- the file size ratio INT8 / float;
- how many quantized layers run integer kernels in the optimized graph;
- the searched metric (fake-quant model in torch) next to the deployed one (onnxruntime).

Models: ``cnn`` (Conv-BN-ReLU, 4 convolutions + 2 Linear, 32x32 input, batch 32),
``resnet`` (ResNet-18 layout with residual adds, 112x112, batch 8) and ``transformer``
(4 ``nn.TransformerEncoderLayer`` blocks, 256 wide, 64 tokens, batch 8) have random
weights (speed and size do not depend on them) with randomized BatchNorm statistics, and
are scored by cosine fidelity to the float model (`FidelityEvaluator`); ``digits`` (the
trained digits CNN, validation accuracy) and ``lstm_lm`` (the trained character LSTM,
validation perplexity) are the bundled examples; ``minilm`` (not in the default list: the
``bench`` extra) is the pretrained all-MiniLM-L6-v2 encoder of `benchmarks.encoder` with
the transformer calibration of docs/calibration.md, a 3.4-point budget on its retrieval
agreement and the output-scope ranking. ``grouped`` (ResNeXt-style groups=8 and depthwise
convolutions, 32x32, batch 8), ``video`` (two Conv3d, 8 frames of 32x32, batch 4) and
``gru`` (a 20k-token embedding, a bidirectional GRU 128 wide and a per-token head, 8 x 32
tokens) are random-init layer forms onnxruntime has no fast integer kernel for; ``silu``
(an EfficientNet-style stem and 3 `MBConv` blocks with squeeze-excitation, 128x128, batch
4) is one whose sigmoids run as integer tables only with their output quantized.

Usage::

    python benchmarks/deploy.py                        # every model
    python benchmarks/deploy.py --models cnn resnet --repeats 50
    python benchmarks/deploy.py --models minilm --repeats 10
    python benchmarks/deploy.py --models grouped video gru silu
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import autoquant as aq
from autoquant.evaluators import FidelityEvaluator
from autoquant.export import export_float_onnx
from autoquant.export.ortmodule import OnnxModule
from autoquant.export.runtime import interleaved_ms, ort_feed, ort_session
from autoquant.quant.target import host_target

__all__ = ["BasicBlock", "ResNet18", "ConvNet", "MBConv", "Tagger", "Case", "CASES", "bench",
           "main"]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 (11.7 M parameters with 1000 classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class ConvNet(nn.Module):
    """A CIFAR-size Conv-BN-ReLU CNN: 4 convolutions (two max pools) and 2 Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(3, 32), *block(32, 64), nn.MaxPool2d(2),
                                      *block(64, 128), *block(128, 128), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(),
                                        nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Encoder(nn.Module):
    """A BERT-style encoder: token projection, `depth` post-norm encoder layers, a head."""

    def __init__(self, dim: int = 256, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(32, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                           activation="gelu")
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(x)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
    return model.eval()


@dataclass
class Case:
    """One benchmark model: how to build it, its evaluator, inputs, budget and config."""

    model: nn.Module
    evaluator: Any
    example_inputs: tuple
    max_loss: float
    loss_type: str = "absolute"
    config: dict | None = None
    note: str = ""
    options: dict | None = None  # more `auto_quantize` keywords


def _fidelity_case(model: nn.Module, shape: tuple[int, ...], batches: int = 2,
                   max_loss: float = 0.002) -> Case:
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(*shape, generator=gen) for _ in range(batches)]
    return Case(model, FidelityEvaluator(model, data), (data[0],), max_loss,
                note="cosine fidelity to float")


def _cnn() -> Case:
    torch.manual_seed(0)
    return _fidelity_case(_randomize_bn(ConvNet()), (32, 3, 32, 32))


def _resnet() -> Case:
    torch.manual_seed(0)
    return _fidelity_case(_randomize_bn(ResNet18(100)), (8, 3, 112, 112))


def _transformer() -> Case:
    torch.manual_seed(0)
    return _fidelity_case(Encoder().eval(), (8, 64, 32))


def _digits() -> Case:
    from autoquant.evaluators import ClassificationEvaluator
    from examples.digits.model import load_data, make_loaders
    from examples.digits.train import get_trained_model

    _, val_loader = make_loaders(batch_size=64)
    images = load_data().val[0]
    return Case(get_trained_model(), ClassificationEvaluator(val_loader), (images[:64],),
                0.01, note="validation accuracy")


def _lstm_lm() -> Case:
    from examples.lstm_lm.data import example_inputs
    from examples.lstm_lm.evaluator import StdlibTextPerplexity
    from examples.lstm_lm.train import get_trained_model

    return Case(get_trained_model(), StdlibTextPerplexity("val"), example_inputs(), 0.01,
                "relative", note="validation perplexity (lower is better)")


def _minilm() -> Case:
    from benchmarks.calibration import ENCODER_SETTINGS
    from benchmarks.encoder import RetrievalAgreement, minilm_encoder

    model = minilm_encoder()
    evaluator = RetrievalAgreement(model)
    return Case(model, evaluator, evaluator.example_inputs(), 3.4,
                config=ENCODER_SETTINGS["transformer"], note="top-10 retrieval agreement")


def _grouped() -> Case:
    torch.manual_seed(0)

    def block(groups: int) -> list[nn.Module]:
        return [nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False),
                nn.BatchNorm2d(64), nn.ReLU()]

    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), *block(8), *block(8),
                          *block(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return _fidelity_case(_randomize_bn(model), (8, 3, 32, 32))


def _video() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 10))
    return _fidelity_case(model.eval(), (4, 3, 8, 32, 32))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand, depthwise 3x3, squeeze-excitation (nn.SiLU and
    nn.Sigmoid modules, as torchvision writes it), 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, mid // 4, 1), nn.SiLU(),
                                nn.Conv2d(mid // 4, mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        y = self.project(y * self.se(y))
        return x + y if self.residual else y


class Tagger(nn.Module):
    """A token tagger: a 20k-token embedding, a bidirectional GRU, a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20000, 64)
        self.gru = nn.GRU(64, 128, batch_first=True, bidirectional=True)
        self.head = nn.Linear(256, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(tokens))[0])


def _gru() -> Case:
    torch.manual_seed(0)
    model = Tagger().eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 20000, (8, 32), generator=gen) for _ in range(2)]
    return Case(model, FidelityEvaluator(model, data), (data[0],), 0.002,
                note="cosine fidelity to float")


def _silu() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
                          MBConv(32, 32), MBConv(32, 64, stride=2), MBConv(64, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return _fidelity_case(_randomize_bn(model), (4, 3, 128, 128))


CASES: dict[str, Callable[[], Case]] = {
    "cnn": _cnn, "resnet": _resnet, "transformer": _transformer, "digits": _digits,
    "lstm_lm": _lstm_lm, "minilm": _minilm, "grouped": _grouped, "video": _video,
    "gru": _gru, "silu": _silu,
}
# minilm: the bench extra; grouped, video, gru: layer forms onnxruntime has no fast
# integer kernel for (grouped and 3-D convolutions, a recurrent op), run on request
DEFAULT = ["cnn", "resnet", "transformer", "digits", "lstm_lm", "silu"]


def bench(name: str, repeats: int, out_dir: Path) -> dict[str, Any]:
    """Search, export and measure one model; the row of figures."""
    case = CASES[name]()
    result = aq.auto_quantize(case.model, case.evaluator, case.example_inputs,
                              max_loss=case.max_loss, loss_type=case.loss_type,
                              config=case.config, verify_deploy=True,
                              **(case.options or {}))
    q_path = result.export_onnx(out_dir / f"{name}_int8.onnx", measure=False)
    f_path = export_float_onnx(result.model, out_dir / f"{name}_float.onnx",
                               case.example_inputs)
    int8, flt = ort_session(q_path), ort_session(f_path)
    feeds = ort_feed(int8, case.example_inputs), ort_feed(flt, case.example_inputs)
    t_int8, t_float = interleaved_ms([lambda: int8.run(None, feeds[0]),
                                      lambda: flt.run(None, feeds[1])], repeats, warmup=5)
    deployed = case.evaluator.evaluate(OnnxModule(q_path, result.model, case.example_inputs))
    figures = result.deployment
    kernels = figures.get("integer_kernels", {})
    return {
        "model": name, "metric": case.note, "status": result.status,
        "quantized": f"{len(result.quantized_layers)}/{len(result.layers)}",
        "evaluations": result.num_evaluations,
        "int8_ms": t_int8, "float_ms": t_float, "latency_ratio": t_int8 / t_float,
        "size_ratio": q_path.stat().st_size / f_path.stat().st_size,
        "kernels": kernels.get("summary", "n/a"), "float_layers": kernels.get("float", {}),
        "searched": result.quant_metric, "deployed": deployed,
        "float_metric": result.float_metric,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT, choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per session")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(name, args.repeats, Path(tmp)) for name in args.models]
    threads = torch.get_num_threads()
    print(f"\nonnxruntime default session options, target {host_target()}, {threads} CPU "
          f"threads, median of {args.repeats} interleaved runs")
    print("| model | metric | quantized | evals | INT8 ms | float ms | INT8/float latency | "
          "INT8/float size | integer kernels | float | searched | deployed |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['metric']} | {r['quantized']} | {r['evaluations']} | "
              f"{r['int8_ms']:.2f} | {r['float_ms']:.2f} | {r['latency_ratio']:.2f} | "
              f"{r['size_ratio']:.2f} | {r['kernels']} | {r['float_metric']:.4f} | "
              f"{r['searched']:.4f} | {r['deployed']:.4f} |")
    for r in rows:
        for layer, reason in r["float_layers"].items():
            print(f"{r['model']}: {layer} runs in float: {reason}")


if __name__ == "__main__":
    main()
