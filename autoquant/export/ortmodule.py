"""`OnnxModule`: an exported ONNX model as an `nn.Module`, so the user's own evaluator scores
the deployed artifact.

It runs an onnxruntime CPU session with default session options (what a user deploys) and
returns outputs in the structure the torch model returned (a tensor, a tuple, a dict, a
Hugging Face ``ModelOutput``-like mapping), as torch tensors on the device of the inputs.
`Evaluator.evaluate(OnnxModule(path, model, example_inputs))` is the deployed metric.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from autoquant.batches import call_model, takes_the_dict_whole
from autoquant.errors import ConfigError, ExportError

__all__ = ["OnnxModule", "ort_session", "dtype_hint", "CPU_UNSUPPORTED", "DTYPE_FIX"]

_TENSOR = object()  # marks where a tensor output goes in the output structure


def ort_session(path: str | Path, threads: int | None = None,
                config: Mapping[str, str] | None = None,
                optimized_model: str | Path | None = None) -> Any:
    """An onnxruntime CPU session on `path` with default options (all graph optimizations),
    `threads` intra-op threads when given, and the session `config` entries; the graph it
    optimized is written to `optimized_model` when given."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(
            "onnxruntime is not installed; pip install 'autoquant[onnx]' to run, check or "
            "measure ONNX models"
        ) from err
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own error types
        raise ExportError(f"onnxruntime cannot load {path}: {err}{dtype_hint(err)}") from err


# float types onnxruntime's CPU kernels do not run for every op: torch dtype -> ONNX name
CPU_UNSUPPORTED = {torch.bfloat16: "bfloat16", torch.float64: "double"}
DTYPE_FIX = "quantize a float32 copy (model.float()) to deploy it"


def dtype_hint(err: BaseException) -> str:
    """The fix for a graph whose float type onnxruntime's CPU kernels lack, else ''."""
    text = str(err)
    for dtype, onnx_type in CPU_UNSUPPORTED.items():
        if f"tensor({onnx_type})" in text:
            return (f". The model computes in {str(dtype)[6:]}, which onnxruntime's CPU "
                    f"kernels do not run (for every op); {DTYPE_FIX}")
    return ""


class OnnxModule(nn.Module):
    """Run the ONNX file at `path` in onnxruntime as if it were the torch `model`.

    Args:
        path: the exported ``.onnx`` file.
        model: the torch model it was exported from (run once on `example_inputs` to learn
            the structure of its output; optional when the output is one tensor or a flat
            tuple).
        example_inputs: inputs `model` runs on (a tuple, a dict of keywords, or a tensor).
        threads: intra-op threads (None: onnxruntime's default).

    Calls take the model's own arguments (positional or keyword, as in the export); non-
    tensor arguments are dropped as the exporter drops them. Gradients do not flow.

    Example:
        >>> deployed = OnnxModule("model_qdq.onnx", result.model, (x,))
        >>> evaluator.evaluate(deployed)
    """

    def __init__(self, path: str | Path, model: nn.Module | None = None,
                 example_inputs: Any = None, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._spec: Any = None
        self._template: list[Any] = []  # the output leaves; _TENSOR where a tensor goes
        self._signature = inspect.signature(model.forward) if model is not None else None
        if model is not None and example_inputs is not None:
            with torch.no_grad():
                leaves, self._spec = tree_flatten(call_model(model, example_inputs))
            self._template = [_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves]

    def __getstate__(self) -> dict[str, Any]:  # sessions do not pickle: rebuild from path
        state = self.__dict__.copy()
        state["session"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session = ort_session(self.path)

    def _tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if kwargs and not args and takes_the_dict_whole(self._signature, kwargs):
            leaves = tree_flatten(kwargs)[0]  # as the exporter flattens that one dict
        elif kwargs and self._signature is not None:
            bound = self._signature.bind(*args, **kwargs)
            leaves = tree_flatten(dict(bound.arguments))[0]
        else:
            leaves = tree_flatten((args, kwargs))[0]
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self._tensors(args, kwargs)
        if len(tensors) != len(self.input_names):
            raise ConfigError(
                f"{self.path.name} takes {len(self.input_names)} input tensor(s) "
                f"({', '.join(self.input_names)}), got {len(tensors)}; call it with the "
                "inputs the model was exported with"
            )
        device = tensors[0].device if tensors else torch.device("cpu")
        feed = {name: t.detach().cpu().numpy() for name, t in
                zip(self.input_names, tensors, strict=True)}
        outputs = [torch.from_numpy(o).to(device) for o in self.session.run(None, feed)]
        if self._spec is not None and sum(v is _TENSOR for v in self._template) == len(outputs):
            it = iter(outputs)
            leaves = [next(it) if v is _TENSOR else v for v in self._template]
            return tree_unflatten(leaves, self._spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
