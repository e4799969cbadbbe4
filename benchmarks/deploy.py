"""Deployment benchmark: file size and latency of torch float, onnxruntime float and
onnxruntime QDQ (the autoquant export), for the digits CNN and a ResNet-18-size conv net.

Usage::

    python benchmarks/deploy.py                 # both models, batch 1 and 32, 2 threads
    python benchmarks/deploy.py --models resnet18 --repeats 10

Latency is the median wall time of repeated runs (after warm-up) with 2 intra-op threads,
one runtime at a time.
The QDQ model is the all-int8 fake-quant model (W8A8: per-channel symmetric weights,
per-tensor affine activations) exported by `autoquant.export.export_onnx`; its outputs are
checked against the torch fake-quant model before timing. The ResNet-18 has random weights
(speed and size do not depend on them); it is built here, without torchvision.
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import autoquant as aq
from autoquant.deploy import median_ms, ort_session, parity
from autoquant.export import export_float_onnx, export_onnx

__all__ = ["BasicBlock", "ResNet18", "main"]


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
    """ResNet-18 (11.7 M parameters) for 224x224 RGB images and 1000 classes."""

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


class _Calibration:
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def calibration(self, model: nn.Module) -> None:
        for x in self.batches:
            model(x)

    def evaluate(self, model: nn.Module) -> float:  # PTQ only: never called
        return 0.0


def _digits() -> tuple[nn.Module, list[torch.Tensor], tuple[int, ...]]:
    from examples.digits.model import load_data
    from examples.digits.train import get_trained_model

    images = load_data().calibration[0]
    return get_trained_model(), [images[:64], images[64:]], (1, 8, 8)


def _resnet18() -> tuple[nn.Module, list[torch.Tensor], tuple[int, ...]]:
    torch.manual_seed(0)
    model = ResNet18().eval()
    gen = torch.Generator().manual_seed(0)
    return model, [torch.randn(4, 3, 224, 224, generator=gen) for _ in range(2)], (3, 224, 224)


MODELS = {"digits": _digits, "resnet18": _resnet18}
# the default session, and one that folds the weight DequantizeLinear nodes into float
# weights at load time (onnxruntime keeps them, and runs them, by default)
QDQ_SESSIONS = {
    "onnxruntime QDQ": {},
    "onnxruntime QDQ, weights folded": {"session.disable_quant_qdq": "1"},
}


def _torch_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def bench(name: str, repeats: int, threads: int, out_dir: Path) -> list[tuple]:
    """Rows ``(model, runtime, bytes, ms at batch 1, ms at batch 32)`` for one model."""
    model, calib, shape = MODELS[name]()
    qmodel = aq.quantize(model, _Calibration(calib))
    example = (torch.randn(2, *shape),)
    f_path = export_float_onnx(qmodel, out_dir / f"{name}_float.onnx", example)
    q_path = export_onnx(qmodel, out_dir / f"{name}_qdq.onnx", example)
    x32 = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = qmodel(x32)
    for label, config in QDQ_SESSIONS.items():
        session = ort_session(q_path, threads, config)
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                  x32.numpy()})[0])
        close = parity([ref], [out])
        print(f"{name}: {label} vs torch fake-quant: max abs diff {close['max_abs_diff']:.2e} "
              f"(max |y| {float(ref.abs().max()):.3g}), matching outputs "
              f"{close['matching_outputs']:.4f}, top-1 agreement "
              f"{float((out.argmax(1) == ref.argmax(1)).float().mean()):.4f}")
        del session

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)  # a note on TF32 for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            other = qmodel(x32)  # the same torch model with its other CPU conv implementation
    close = parity([ref], [other])
    print(f"{name}: for scale, torch fake-quant without vs with oneDNN convolutions: max abs "
          f"diff {close['max_abs_diff']:.2e}, matching outputs {close['matching_outputs']:.4f}")

    torch.set_num_threads(threads)
    runtimes: list[tuple[str, object, dict[str, str]]] = [
        ("torch float", model, {}), ("torch fake-quant", qmodel, {}),
        ("onnxruntime float", f_path, {}),
        *((label, q_path, config) for label, config in QDQ_SESSIONS.items()),
    ]
    # One runtime at a time, each onnxruntime session closed before the next is timed:
    # an idle session's worker threads spin for a while after each run and would steal the
    # two cores from whatever runs next (torch's batch-1 latency suffered tenfold from it).
    rows = []
    for runtime, target, config in runtimes:
        session = None
        if isinstance(target, nn.Module):
            size = _torch_bytes(target)
        else:
            session = ort_session(target, threads, config)
            size = Path(target).stat().st_size
        times = []
        for batch in (1, 32):
            x = x32[:batch]
            if session is None:
                def run(net: nn.Module = target, x: torch.Tensor = x) -> None:
                    with torch.no_grad():
                        net(x)
            else:
                feed = {session.get_inputs()[0].name: x.numpy()}

                def run(session=session, feed=feed) -> None:  # type: ignore[no-untyped-def]
                    session.run(None, feed)
            times.append(median_ms(run, repeats=repeats if batch == 1 else max(3, repeats // 4),
                                   warmup=5))
        del session
        gc.collect()
        rows.append((name, runtime, size, *times))
    return rows


def digits_parity(out_dir: Path) -> None:
    """Search the digits CNN (W8A8, at most 1 point of accuracy), export the result with
    `SearchResult.export_onnx` and compare accuracies: float, searched model, onnxruntime."""
    from evaluators import ClassificationEvaluator
    from examples.digits.model import load_data, make_loaders
    from examples.digits.train import get_trained_model

    model = get_trained_model()
    _, val_loader = make_loaders(batch_size=64)
    images, labels = load_data().val
    result = aq.auto_quantize(model, ClassificationEvaluator(val_loader), (images[:64],),
                              max_loss=0.01)
    path = result.export_onnx(out_dir / "digits_searched.onnx")
    session = ort_session(path)
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                 images.numpy()})[0])
    with torch.no_grad():
        ref = result.model(images)
    close = parity([ref], [logits])
    acc = float((logits.argmax(1) == labels).float().mean())
    print(f"digits search: plan {result.plan}")
    print(f"val accuracy: float {result.float_metric:.4f}, searched fake-quant "
          f"{result.quant_metric:.4f}, onnxruntime QDQ {acc:.4f}; logits max abs diff "
          f"{close['max_abs_diff']:.2e}, matching {close['matching_outputs']:.4f}")
    print(f"report deployment entry: {result.to_report()['settings']['deployment']}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed runs at batch 1 (a quarter of them, at least 3, at 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-parity", action="store_true",
                        help="skip the digits search and accuracy comparison")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_parity:
            digits_parity(Path(tmp))
        rows = [row for name in args.models
                for row in bench(name, args.repeats, args.threads, Path(tmp))]
    print(f"\n| model | runtime | file size | batch 1 (ms) | batch 32 (ms) |  "
          f"({args.threads} threads, median)")
    print("|---|---|---:|---:|---:|")
    for name, runtime, size, t1, t32 in rows:
        print(f"| {name} | {runtime} | {size / 1e6:.3f} MB | {t1:.2f} | {t32:.1f} |")


if __name__ == "__main__":
    main()
