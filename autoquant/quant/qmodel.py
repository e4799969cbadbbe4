"""`QuantModel`: a deep copy of the user's model with every quantizable layer wrapped.

It owns the copy for a whole run: BN folding, wrapping by qualified name, the explicit
quantizer state of every layer, calibration (once), and applying plans for trials.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from autoquant.batches import call_model
from autoquant.config import QuantConfig
from autoquant.errors import ConfigError, EvaluatorError, ModelError
from autoquant.plan import FLOAT, QuantPlan
from autoquant.quant.activations import quantize_sigmoids
from autoquant.quant.adapt import adapt_library_modules
from autoquant.quant.copying import (
    bake_weight_reparametrizations,
    check_finite_weights,
    check_model_devices,
    copy_model,
    uncompiled,
)
from autoquant.quant.dataflow import OutputUse, output_uses, trace_layers
from autoquant.quant.dynflow import watched_uses
from autoquant.quant.fold import fold_conv_bn
from autoquant.quant.kind_registry import (
    layer_kinds,
    unquantized_weight_modules,
    weight_axis_of,
    wrapper_class_of,
)
from autoquant.quant.kinds import QuantEmbedding  # noqa: F401 - registers the extra layer kinds
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.shared import layers_sharing_parameters, module_aliases
from autoquant.quant.target import resolve_target

__all__ = ["QuantModel", "Calibrate", "find_quantizable_layers"]

# runs calibration batches through a model: ``calibrate(model, where)`` (the search passes
# `autoquant.evaluation.adapter.EvaluatorAdapter.calibrate`; PTQ never sees the evaluator)
Calibrate = Callable[[nn.Module, str], None]

logger = logging.getLogger(__name__)

_KEPT_BATCHES = 4


def find_quantizable_layers(model: nn.Module) -> list[str]:
    """Qualified names of the quantizable modules of `model`, in module order.

    Layers whose parent reads their weight directly instead of calling them (the output
    projection of `nn.MultiheadAttention`) are not listed: wrapping them would not quantize.
    A module object reachable under several names (a shared module) is listed once, under
    its first name (see `autoquant.quant.shared.module_aliases`).
    """
    names: list[str] = []
    seen: set[int] = set()
    for parent_name, parent in model.named_modules():
        if isinstance(parent, (QuantLayer, nn.MultiheadAttention)):
            continue
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, QuantLayer):
                names.append(full)
            elif weight_axis_of(child) is not None:
                if any(p.numel() == 0 for p in child.parameters(recurse=False)):
                    logger.info("layer %s has an empty weight (a zero-size dimension): it "
                                "stays float", full)
                    continue
                names.append(full)
    return names


def _warn_unquantized(model: nn.Module, names: list[str]) -> None:
    """Say which weight-carrying modules stay float because autoquant does not know them."""
    for kind, where in unquantized_weight_modules(model, set(names)).items():
        logger.warning(
            "%d %s module(s) have a weight but are no quantizable kind, so they stay float "
            "(%s); if %s computes a matrix product or a convolution, make it quantizable "
            "with autoquant.register_layer_kind(%s, weight_axis=<its output-channel axis>)",
            len(where), kind, ", ".join(where[:3]) + (", ..." if len(where) > 3 else ""),
            kind, kind)


def _check_no_alias_in_config(config: QuantConfig, aliases: dict[str, list[str]]) -> None:
    """A config naming a shared module by a second name gets a pointed error."""
    canonical = {alias: name for name, others in aliases.items() for alias in others}
    for name in [*config.layers, *config.skip_layers]:
        if name in canonical:
            raise ConfigError(
                f"the quant config names {name!r}, which is the same module object as "
                f"{canonical[name]!r} (a shared module is one unit); use {canonical[name]!r}"
            )


def _working_copy(model: nn.Module) -> nn.Module:
    """Our eval-mode copy of the user's model, reparametrizations baked (see
    `autoquant.quant.copying`); TorchScript and data-less models are refused."""
    model = uncompiled(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit."
            "script or torch.jit.trace), whose layers cannot be swapped for quantized "
            "ones; pass the Python nn.Module it was made from"
        )
    work = copy_model(model)
    check_model_devices(work)
    work.eval()
    bake_weight_reparametrizations(work)
    adapt_library_modules(work)
    return work


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class QuantModel:
    """Wraps a deep copy of `model`; the user's model is never touched.

    Args:
        model: the float model.
        config: quantization settings; its layer names are checked against the model.
        example_inputs: optional inputs (tuple of positional args, or a dict of keyword
            args) used to check that the model runs before anything expensive happens.
    """

    def __init__(self, model: nn.Module, config: QuantConfig, example_inputs: Any = None):
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, QuantConfig):
            raise ConfigError(
                f"config must be an autoquant.QuantConfig, got {type(config).__name__}; "
                "build one with QuantConfig.from_dict(...) or QuantConfig.load(path)"
            )
        self.model = _working_copy(model)
        self.config = config
        names = find_quantizable_layers(self.model)
        if not names:
            kinds = ", ".join(sorted(k.__name__ for k in layer_kinds()))
            raise ModelError(
                f"{type(model).__name__} has no quantizable layer ({kinds}); there is nothing "
                "to quantize. A module type of your own becomes one with "
                "autoquant.register_layer_kind(type, weight_axis=...); a functional "
                "F.linear / F.conv call on a bare parameter is not a layer: make it an "
                "nn.Linear / nn.Conv module"
            )
        _warn_unquantized(self.model, names)
        _check_no_alias_in_config(config, module_aliases(self.model))
        config.check_layers(names)
        self.folded: list[tuple[str, str]] = fold_conv_bn(self.model) if config.fold_bn else []
        if self.folded:
            logger.info("folded %d Conv-BatchNorm pair(s)", len(self.folded))
        skipped = set(config.skip_layers)
        # canonical name -> other names of the same (shared) module object
        self.aliases: dict[str, list[str]] = {
            n: a for n, a in module_aliases(self.model).items() if n in set(names)
        }
        self.calls_per_forward: dict[str, float] = {}
        self.target = resolve_target(config.target)
        self.skipped: list[str] = [n for n in names if n in skipped]
        self.layers: dict[str, QuantLayer] = self._wrap([n for n in names if n not in skipped])
        for name, others in self.aliases.items():
            logger.info("layer %s is shared (also %s): one wrapper, one scheme", name,
                        ", ".join(others))
        self.tied = layers_sharing_parameters({n: layer.module for n, layer in self.layers.items()})
        if self.tied:
            logger.info("layers sharing a parameter (each is its own unit): %s",
                        "; ".join(f"{n} ~ {', '.join(o)}" for n, o in self.tied.items()))
        self.all_layers = names
        self.never_executed: list[str] = []
        self.calibration_inputs: list[Any] = []  # the first calibration batches
        graph = trace_layers(self.model, self.layers)
        self.output_uses: dict[str, OutputUse] | None = \
            None if graph is None else output_uses(self.model, self.layers, graph)
        quantize_sigmoids(self.model, self.layers, graph)  # where QLinearSigmoid fuses
        if example_inputs is not None:
            self.check_runs(example_inputs)  # also finds the output uses fx could not

    def _wrap(self, names: list[str]) -> dict[str, QuantLayer]:
        """Swap each of `names` for its kind's wrapper, one wrapper at every alias."""
        layers: dict[str, QuantLayer] = {}
        for name in names:
            module = self.model.get_submodule(name)
            check_finite_weights(name, module)
            wrapper = wrapper_class_of(module)
            layer = wrapper(module, name, self.config.layer_config(name),
                            weight_axis_of(module))
            layer.target = self.target
            for where in (name, *self.aliases.get(name, ())):
                _set_submodule(self.model, where, layer)
            layers[name] = layer
        return layers

    # -- state -----------------------------------------------------------------------------
    def set_state(self, state: QuantState) -> None:
        """Put every wrapped layer in `state`."""
        for layer in self.layers.values():
            layer.state = state

    @contextlib.contextmanager
    def state(self, state: QuantState) -> Iterator[None]:
        """Run a block with every layer in `state`, then return to QUANTIZE."""
        self.set_state(state)
        try:
            yield
        finally:
            self.set_state(QuantState.QUANTIZE)

    def calibration_pass(self, calibrate: Calibrate, state: QuantState, where: str,
                         hooks: Iterable[Any] = ()) -> None:
        """Run the calibration batches once (`calibrate`) with every layer in `state`, then
        remove `hooks` (handles of hooks the caller registered for this pass), whatever
        happens."""
        try:
            with self.state(state):
                calibrate(self.model, where)
        finally:
            for hook in hooks:
                hook.remove()

    def check_runs(self, example_inputs: Any) -> None:
        """Run the float model once on `example_inputs`; a failure is a clear ModelError."""
        with self.state(QuantState.FLOAT), torch.no_grad():
            try:
                traced = self.output_uses is not None
                if not traced:  # fx could not trace: one watched pass finds the uses and checks
                    fold = self.config.fold_bn and not self.calibration_inputs  # uncalibrated
                    self.output_uses = watched_uses(self.model, self.layers, example_inputs,
                                                    self.folded if fold else None)
                if traced or self.output_uses is None:  # a failed watched pass: raise its error
                    call_model(self.model, example_inputs)
            except Exception as err:
                raise ModelError(
                    f"the model does not run on example_inputs ({type(err).__name__}: {err}). "
                    "Pass example_inputs as a tuple of positional arguments, e.g. (x,), on "
                    "the model's device, with the shape the model expects."
                ) from err

    # -- calibration -----------------------------------------------------------------------
    def calibrate(self, calibrate: Calibrate, hooks: Iterable[Any] = ()) -> None:
        """Run the calibration batches once with every layer observing its input; `hooks`
        (handles) are removed after that pass, before any other forward runs."""
        for layer in self.layers.values():
            layer.calls = 0
        forwards = [0]
        self.calibration_inputs = []

        def count(_module: Any, args: tuple, kwargs: dict) -> None:
            forwards[0] += 1
            # a few batches as the model got them, for the export's parity check
            if len(self.calibration_inputs) < _KEPT_BATCHES and not (args and kwargs):
                self.calibration_inputs.append(dict(kwargs) if kwargs else tuple(args))

        for name, use in (self.output_uses or {}).items():
            self.layers[name].out_relu = use.through_relu  # before the output observers run
        self.calibration_pass(calibrate, QuantState.CALIBRATE, "", [
            self.model.register_forward_pre_hook(count, with_kwargs=True), *hooks])
        if self.output_uses is None and self.calibration_inputs:  # fx failed, no example
            self.check_runs(self.calibration_inputs[0])
        if forwards[0]:
            # a module called at several places in one forward pass is a shared module too
            self.calls_per_forward = {n: q.calls / forwards[0] for n, q in self.layers.items()}
            for name, per in self.calls_per_forward.items():
                if per > 1:
                    logger.info("layer %s runs %.3g times per forward pass: one wrapper, "
                                "one scheme, ranges calibrated over every call", name, per)
        self.never_executed = [n for n, layer in self.layers.items() if layer.calls == 0]
        if self.layers and len(self.never_executed) == len(self.layers):
            raise EvaluatorError(
                "Evaluator.calibration() ran no forward pass through any quantizable layer; "
                "it must call model(...) on a few representative batches"
            )
        if self.never_executed:
            logger.warning(
                "%d layer(s) never ran during calibration and stay float: %s",
                len(self.never_executed),
                ", ".join(self.never_executed[:10]) + (" ..." if len(self.never_executed) > 10
                                                       else ""),
            )

    @property
    def searchable(self) -> list[str]:
        """Layers the search may switch: wrapped and executed during calibration."""
        dead = set(self.never_executed)
        return [n for n in self.layers if n not in dead]

    # -- plans -----------------------------------------------------------------------------
    def quant_plan(self) -> QuantPlan:
        """Every searchable layer at its configured quantized scheme."""
        return {n: self.layers[n].config.scheme for n in self.searchable}

    def float_plan(self) -> QuantPlan:
        """Every searchable layer in float."""
        return dict.fromkeys(self.searchable, FLOAT)

    def apply_plan(self, plan: Mapping[str, str]) -> None:
        """Set each layer's scheme from `plan`; layers not in it run float."""
        for name, layer in self.layers.items():
            layer.set_scheme(plan.get(name, FLOAT))
        self._set_requant()
        self.set_state(QuantState.QUANTIZE)

    def requant_reason(self, name: str) -> str | None:
        """Why the integer convolution `name` needs an output quantizer of its own in the
        active plan (its output is not read by exactly one quantizing layer), else None."""
        use = (self.output_uses or {}).get(name)
        if use is None:
            return None
        if use.others or len(use.consumers) != 1:
            readers = [*use.consumers, *use.others]
            return f"its output is read by {', '.join(readers) or 'nothing'}"
        reader = self.layers.get(use.consumers[0])
        if reader is None:
            return f"its reader {use.consumers[0]} is not quantized"
        if not _quantizes_input_exactly(reader):
            return f"its reader {reader.layer_name} has no static 8-bit input quantizer"
        if use.through_relu and int(reader.act_zero_point.reshape(-1)[0]) != reader.act_range[0]:
            # onnxruntime drops a ReLU before a Q only when the zero point is the range start
            return f"the ReLU before {reader.layer_name} cannot be folded into its quantizer"
        return None

    def _set_requant(self) -> None:
        for name, layer in self.layers.items():
            layer.requant = False
            layer.requant_note = None
            if not (layer.integer_kernel and layer.out_range is not None):
                continue
            if self.output_uses is None:
                layer.requant_note = ("its output is not requantized (neither torch.fx nor "
                                      "a forward pass found the layer that reads it), so "
                                      "QLinearConv cannot fuse")
            elif self.requant_reason(name):
                layer.requant = True

    def finalize(self, plan: Mapping[str, str]) -> nn.Module:
        """Apply `plan` for good: float layers are unwrapped back to their original module,
        so the model has the structure of `final_config` (and its state dict loads there)."""
        self.apply_plan(plan)
        for name in list(self.layers):
            if plan.get(name, FLOAT) == FLOAT:
                original = self.layers.pop(name).module
                for where in (name, *self.aliases.get(name, ())):
                    _set_submodule(self.model, where, original)
        return self.model.eval()  # an evaluator may have left it in train mode

    def layer_rows(self) -> list[dict[str, Any]]:
        """Name, type, parameter count, mode, aliases and calls per forward pass of every
        quantizable layer (for reports)."""
        rows = []
        for name in self.all_layers:
            module = self.model.get_submodule(name)
            inner = module.module if isinstance(module, QuantLayer) else module
            rows.append({
                "name": name,
                "type": type(inner).__name__,
                "parameters": sum(p.numel() for p in inner.parameters()),
                "weight_elements": _weight_elements(module, inner),
                "mode": module.config.mode if isinstance(module, QuantLayer) else None,
                "aliases": list(self.aliases.get(name, ())),
                "calls_per_forward": self.calls_per_forward.get(name),
                "shares_parameters_with": list(self.tied.get(name, ())),
            })
        return rows


def _weight_elements(module: nn.Module, inner: nn.Module) -> int:
    """How many parameter elements of a layer its scheme quantizes (the rest, e.g. a bias,
    stays float): the report's stored sizes count these at their storage width."""
    names = getattr(module, "weight_names", None) or ("weight",)
    total = 0
    for name in names:
        value: Any = inner
        for part in name.split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor):
            total += value.numel()
    return total


def _quantizes_input_exactly(layer: QuantLayer) -> bool:
    """True when `layer`'s input quantizer is a plain 8-bit per-tensor QuantizeLinear (no
    narrowing Clip before it), the Q a runtime fuses into the op producing that input."""
    act = layer.act_range
    if not layer.active or not isinstance(act, tuple) or \
            layer.config.mode != "static" or act[2] is not None:
        return False
    return (act[1] - act[0]) == 255
