"""The deployed artifact in onnxruntime with default session options: sessions and feeds,
timing, and the parity of its outputs with the searched model (the check every export
runs, naming the first diverging layer).

Used by `autoquant.export.export_onnx` (the parity check of every export),
`autoquant.export.measure` and ``benchmarks/deploy.py``. onnxruntime is optional (the
``onnx`` extra) and imported only when a session is made.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoquant.batches import call_model
from autoquant.errors import ConfigError, ExportError
from autoquant.export.ortmodule import ort_session

__all__ = [
    "noise_floor",
    "ort_session",
    "ort_feed",
    "ort_run",
    "median_ms",
    "interleaved_ms",
    "flat_outputs",
    "parity",
    "parity_ok",
    "float_layers",
    "check_parity",
    "run_torch",
    "tensors_of",
]

logger = logging.getLogger(__name__)

# output agreement accepted by the parity check (see `parity_ok`)
MAX_RELATIVE_ERROR = 1e-2


def tensors_of(example_inputs: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    if isinstance(example_inputs, Mapping):
        leaves = tree_leaves(dict(example_inputs))
    elif isinstance(example_inputs, (tuple, list)):
        leaves = tree_leaves(tuple(example_inputs))
    else:
        leaves = [example_inputs]
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def ort_feed(session: Any, example_inputs: Any) -> dict[str, Any]:
    """The input dict of `session` for `example_inputs` (the tensors, in flattened order)."""
    tensors = tensors_of(example_inputs)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ConfigError(
            f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}) but the example "
            f"inputs hold {len(tensors)} tensor(s); pass the inputs the model was exported with"
        )
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def ort_run(session: Any, example_inputs: Any) -> list[Any]:
    """Run `session` on `example_inputs`; the outputs as numpy arrays."""
    return session.run(None, ort_feed(session, example_inputs))


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, list or dict), in flattened order."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def median_ms(fn: Callable[[], Any], repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` runs, after `warmup`."""
    return interleaved_ms([fn], repeats, warmup)[0]


def interleaved_ms(fns: Sequence[Callable[[], Any]], repeats: int = 30,
                   warmup: int = 3) -> list[float]:
    """Median wall time in ms of each of `fns`, timed in turn (A B A B ...), so a drift in
    the machine's speed hits all alike: compare them as ratios."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(t) for t in times]


def run_torch(model: nn.Module, example_inputs: Any) -> Any:
    with torch.no_grad():
        return call_model(model, example_inputs)


def parity(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, float]:
    """How closely `outputs` (e.g. onnxruntime's) match `reference` (the torch model's).

    ``max_abs_diff``: the largest absolute difference, and ``relative_max_diff`` that over
    ``1 + max|reference|``; ``relative_error``: ``||out - ref|| / ||ref||``;
    ``matching_outputs``: the fraction of elements within ``1e-4 * (1 + max|reference|)``
    (the rest are the rare one-step rounding flips of a different float summation order).
    """
    ref = torch.cat([t.detach().float().cpu().reshape(-1) for t in reference])
    out = torch.cat([t.detach().float().cpu().reshape(-1) for t in outputs])
    if ref.numel() == 0:
        return {"max_abs_diff": 0.0, "relative_max_diff": 0.0, "relative_error": 0.0,
                "matching_outputs": 1.0}
    diff = (out - ref).abs()
    scale = 1.0 + float(ref.abs().max())
    norm = float(ref.norm())
    return {"max_abs_diff": float(diff.max()),
            "relative_max_diff": float(diff.max()) / scale,
            "relative_error": float(diff.norm()) / norm if norm > 0 else float(diff.norm()),
            "matching_outputs": float((diff <= 1e-4 * scale).float().mean())}


def parity_ok(figures: Mapping[str, float]) -> bool:
    """The parity check's tolerance on the relative L2 error of the runtime against the
    searched model: at most 1%, a tenth of the quantization error itself
    (``quantization_error``: the searched model against float), or the model's own noise
    floor (``noise_floor``, `noise_floor`), whichever is largest.

    Why relative to the quantization error: the runtime's own float ops (its Tanh, its
    summation order) differ from torch's by an ulp, which moves a value on a rounding tie
    to the next integer; a deep or chaotic network amplifies such flips to a percent while
    its quantization error is tens of percents. A saturating kernel or a wrong scale is of
    the order of the quantization error or more, and misses it."""
    floor = max(MAX_RELATIVE_ERROR, 0.1 * figures.get("quantization_error", 0.0),
                figures.get("noise_floor", 0.0))
    return figures["relative_error"] <= floor


NOISE = 1e-6  # relative perturbation of `noise_floor`: a few float32 ulps


def noise_floor(model: nn.Module, batches: Sequence[Any], seed: int = 0) -> float:
    """How far the searched model moves from itself when every quantized layer's input is
    perturbed by `NOISE` relative noise: the relative L2 change of its outputs.

    Why: a runtime's float ops (GELU, Softmax, LayerNorm) differ from torch's by a few ulps,
    and each quantizer turns a value near a rounding boundary into a one-step jump; a deep
    encoder amplifies these flips (all-MiniLM-L6-v2: 2-4% at its output). No runtime can
    match the model more closely than the model matches itself at that noise."""
    from autoquant.quant.layers import QuantLayer

    generator = torch.Generator().manual_seed(seed)

    def perturb(_module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
        return (x * (1 + NOISE * noise), *args[1:])

    clean = [t.detach().cpu().float() for b in batches for t in flat_outputs(run_torch(model, b))]
    handles = [m.register_forward_pre_hook(perturb) for m in model.modules()
               if isinstance(m, QuantLayer) and m.active]
    try:
        noisy = [t.detach().cpu().float() for b in batches
                 for t in flat_outputs(run_torch(model, b))]
    finally:
        for handle in handles:
            handle.remove()
    return parity(clean, noisy)["relative_error"]


@contextlib.contextmanager
def float_layers(model: nn.Module) -> Iterator[None]:
    """Run `model`'s quantized layers in float inside the block (their states restored)."""
    from autoquant.quant.layers import QuantLayer, QuantState

    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    states = [m.state for m in layers]
    try:
        for m in layers:
            m.state = QuantState.FLOAT
        yield
    finally:
        for m, state in zip(layers, states, strict=True):
            m.state = state


def _layer_outputs(model: nn.Module, batches: Iterable[Any], every: bool = False
                   ) -> dict[str, list[torch.Tensor]]:
    """The output of every active quantized layer of `model` (`every`: of every wrapped
    layer) on `batches`, by layer name."""
    from autoquant.batches import primary_tensor
    from autoquant.quant.layers import QuantLayer

    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer) and (every or module.active) and \
                name not in seen:
            seen[name] = []

            def hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
                seen[name].append(primary_tensor(out).detach().float().cpu())

            handles.append(module.register_forward_hook(hook))
    try:
        for batch in batches:
            run_torch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _layer_of(namespace: str, layers: set[str]) -> str | None:
    # "…/c1: autoquant.export.qdq.QDQLayer/conv2d: aten.conv2d.default" -> "c1"
    found = None
    for part in namespace.split("/"):
        name = part.split(": ")[0].strip()
        if name in layers:
            found = name
    return found


def first_diverging_layer(model: nn.Module, onnx_path: str | Path,
                          batches: Sequence[Any]) -> tuple[str, dict[str, float]] | None:
    """The first quantized layer (in graph order) whose onnxruntime output misses the
    parity tolerance, with its figures; None if none does (the divergence is after them).

    Each layer's last node becomes an extra graph output of a copy of the file; that can
    change which ops onnxruntime fuses, so a miss inside a fused kernel may not show."""
    import onnx

    proto = onnx.load(str(onnx_path))
    reference = _layer_outputs(model, batches)
    with float_layers(model):
        floats = _layer_outputs(model, batches, every=True)
    quant_error = {n: parity(floats[n], ref)["relative_error"] for n, ref in reference.items()
                   if n in floats and len(floats[n]) == len(ref)}
    names = set(reference)
    last: dict[str, str] = {}
    order: list[str] = []
    for node in proto.graph.node:
        ns = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        layer = _layer_of(ns, names)
        if layer is not None and node.output:
            if layer not in last:
                order.append(layer)
            last[layer] = node.output[0]
    existing = {o.name for o in proto.graph.output}
    for layer in order:
        if last[layer] not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=last[layer]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "diagnose.onnx"
        onnx.save(proto, str(path))
        session = ort_session(path)
        wanted = [last[layer] for layer in order]
        runs = [session.run(wanted, ort_feed(session, batch)) for batch in batches]
    for i, layer in enumerate(order):
        ours = [torch.from_numpy(run[i]) for run in runs]
        theirs = reference[layer]
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in
                                           zip(ours, theirs, strict=True)):
            continue
        figures = parity(theirs, ours)
        figures["quantization_error"] = quant_error.get(layer, 0.0)
        if not parity_ok(figures):
            return layer, figures
    return None


def check_parity(model: nn.Module, onnx_path: str | Path, batches: Sequence[Any],
                 strict: bool = True) -> dict[str, Any]:
    """Run the exported file in onnxruntime (default options) on `batches` and compare its
    outputs with `model`'s; the figures of `parity` plus ``parity_ok``.

    Beyond the tolerance (`parity_ok`) it raises `ExportError` naming the first diverging
    layer and the fix, or with ``strict=False`` logs that as a warning.
    """
    session = ort_session(onnx_path)
    fitting = [b for b in batches if _fits(session, b)]
    if len(fitting) < len(batches):
        logger.info("the parity check skips %d batch(es) whose shapes the exported graph does "
                    "not take (it keeps axes static that the model specializes)",
                    len(batches) - len(fitting))
    batches = fitting
    ours: list[torch.Tensor] = []
    theirs: list[torch.Tensor] = []
    for batch in batches:
        try:
            ort_out = ort_run(session, batch)
        except ConfigError:
            raise
        except Exception as err:
            raise ExportError(f"onnxruntime cannot run the exported {onnx_path} on the "
                              f"example inputs: {err}") from err
        torch_out = [t.detach().cpu().float() for t in flat_outputs(run_torch(model, batch))]
        if len(torch_out) != len(ort_out):
            raise ExportError(
                f"the exported {onnx_path} returns {len(ort_out)} output(s) but the model "
                f"returns {len(torch_out)} tensor(s); please report this model")
        theirs += torch_out
        ours += [torch.from_numpy(o) for o in ort_out]
    figures: dict[str, Any] = {**parity(theirs, ours), "parity_batches": len(batches)}
    with float_layers(model):
        floats = [t.detach().cpu().float() for batch in batches
                  for t in flat_outputs(run_torch(model, batch))]
    figures["quantization_error"] = parity(floats, theirs)["relative_error"]
    figures["parity_ok"] = parity_ok(figures)
    if not figures["parity_ok"]:  # beyond the fixed tolerance: is the model chaotic?
        figures["noise_floor"] = noise_floor(model, batches)
        figures["parity_ok"] = parity_ok(figures)
        if figures["parity_ok"]:
            logger.info("the runtime differs from the searched model by %.3g (relative), "
                        "within the model's own noise floor %.3g: a %g relative perturbation "
                        "of its quantized layers' inputs moves it as far",
                        figures["relative_error"], figures["noise_floor"], NOISE)
    if figures["parity_ok"]:
        return figures
    found = first_diverging_layer(model, onnx_path, batches)
    where = (f"; the first layer that diverges is {found[0]!r} (relative error "
             f"{found[1]['relative_error']:.3g})" if found else "")
    message = (
        f"the exported model does not compute what the searched model computes in "
        f"onnxruntime (default session options): relative error "
        f"{figures['relative_error']:.3g}, max abs diff {figures['max_abs_diff']:.3g}"
        f"{where}. If the model was searched for another CPU (QuantConfig.target), search "
        "again with target 'auto' (this CPU) or 'x86_avx2' (exact everywhere); otherwise keep "
        "that layer float (skip_layers) and report the model"
    )
    if strict:
        raise ExportError(message)
    logger.warning(message)
    return figures


def _fits(session: Any, batch: Any) -> bool:
    """True when every tensor of `batch` has the graph input's static dimensions."""
    tensors = tensors_of(batch)
    inputs = session.get_inputs()
    if len(tensors) != len(inputs):
        return True  # let the run say what is wrong
    for tensor, spec in zip(tensors, inputs, strict=True):
        shape = spec.shape
        if len(shape) != tensor.dim() or any(isinstance(d, int) and d != n
                                             for d, n in zip(shape, tensor.shape, strict=True)):
            return False
    return True
