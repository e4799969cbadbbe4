"""`FidelityEvaluator`: cosine similarity of a model's outputs to a reference model's.

Needs no labels, so any model with a few sample inputs can be searched: the metric is how
closely the quantized model reproduces the float model's outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autoquant.batches import call_model, first_tensor, model_device, to_device
from autoquant.errors import ConfigError, ModelError
from autoquant.evaluation.functional import calibration_inputs
from autoquant.evaluators.base import Evaluator

__all__ = ["FidelityEvaluator"]


def _check_batches(batches: Any, name: str) -> list[Any]:
    """`batches` (a list, or a ``DataLoader``: read once, so a shuffling loader still gives
    every evaluation the same batches) as a list, or ConfigError if it holds no batch.

    A list batch is what a ``DataLoader`` yields for ``(inputs, target)`` samples: its first
    element is the input (`autoquant.evaluation.functional.calibration_inputs`)."""
    if isinstance(batches, (torch.Tensor, str, bytes, Mapping, Iterator)) or \
            not isinstance(batches, Iterable):
        raise ConfigError(
            f"{name} must be a list of batches (each a tensor, a tuple or a dict of tensors) or "
            f"a DataLoader, got {type(batches).__name__}; wrap a single batch as [x]."
        )
    batches = [calibration_inputs(b) if isinstance(b, list) else b for b in batches]
    if len(batches) == 0:
        raise ConfigError(f"{name} is empty; pass at least one batch, e.g. [x].")
    for index, batch in enumerate(batches):
        ok = isinstance(batch, torch.Tensor) or (
            isinstance(batch, (tuple, Mapping))
            and len(batch) > 0
            and any(isinstance(item, torch.Tensor)
                    for item in (batch.values() if isinstance(batch, Mapping) else batch))
        )
        if not ok:
            raise ConfigError(
                f"{name}[{index}] is {type(batch).__name__}; expected a tensor, a tuple of "
                "tensors (passed as model(*batch)) or a dict of them (model(**batch)). "
                "Convert it before building the evaluator."
            )
    return list(batches)


def _cosine(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine similarity of two flattened tensors, in float64; 1.0 if both are zero."""
    a = output.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    b = reference.reshape(-1).to(device="cpu", dtype=torch.float64)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    if norm_a == 0 and norm_b == 0:
        return 1.0
    if norm_a == 0 or norm_b == 0:
        return 0.0
    value = float((a @ b) / (norm_a * norm_b))
    return max(-1.0, min(1.0, value))


class FidelityEvaluator(Evaluator):
    """Mean cosine similarity between a model's outputs and a reference model's outputs.

    Why: lets a search run without labels or a task metric; the float model is the oracle.

    The reference outputs are computed once, at construction, with the reference model in
    eval mode under ``torch.no_grad()``; the reference model's training flags are restored
    afterwards and it is not kept. A batch is a tensor, a tuple (``model(*batch)``) or a dict
    (``model(**batch)``). A dict output (or a Hugging Face ``ModelOutput``) is compared on
    its ``logits`` entry, else its first tensor; a tuple/list output on its first tensor.

    Args:
        reference_model: the float model whose outputs are the target.
        inputs: a list of batches (or a DataLoader, read once), each a tensor, a tuple of
            tensors (``model(*batch)``) or a dict of keyword inputs (``model(**batch)``); a
            list batch (a DataLoader's ``[inputs, target]``) gives its first element.
        calibration_inputs: batches `calibration` runs; default: `inputs`.

    Raises:
        ConfigError: if `inputs` or `calibration_inputs` is not a non-empty list of batches.

    Example:
        >>> evaluator = FidelityEvaluator(model, [x1, x2])
        >>> evaluator.evaluate(model)
        1.0
    """

    higher_is_better: bool = True

    def __init__(
        self,
        reference_model: nn.Module,
        inputs: Sequence[Any],
        calibration_inputs: Sequence[Any] | None = None,
    ) -> None:
        if not isinstance(reference_model, nn.Module):
            raise ConfigError(
                f"reference_model must be a torch.nn.Module, got "
                f"{type(reference_model).__name__}; pass the float model."
            )
        self.inputs = _check_batches(inputs, "inputs")
        self.calibration_inputs = (
            self.inputs
            if calibration_inputs is None
            else _check_batches(calibration_inputs, "calibration_inputs")
        )
        self.reference_outputs = self._reference_outputs(reference_model)

    def _reference_outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """Run `model` in eval mode over `inputs`; restore every module's training flag."""
        modes = {module: module.training for module in model.modules()}
        device = model_device(model)
        outputs: list[torch.Tensor] = []
        try:
            model.eval()
            with torch.no_grad():
                for batch in self.inputs:
                    output = first_tensor(call_model(model, to_device(batch, device)))
                    if not output.is_floating_point():
                        output = output.float()
                    outputs.append(output.detach().clone())
        finally:
            for module, training in modes.items():
                module.training = training
        return outputs

    def calibration(self, model: nn.Module) -> None:
        """Run `model` over `calibration_inputs` (default: `inputs`).

        Why: quantizer observers record ranges during these forward passes.
        """
        device = model_device(model)
        with torch.no_grad():
            for batch in self.calibration_inputs:
                call_model(model, to_device(batch, device))

    def evaluate(self, model: nn.Module) -> float:
        """Return the mean cosine similarity to the reference outputs, in [-1, 1].

        Why: 1.0 means the model reproduces the reference exactly; the search keeps the
        drop from the float model's score within ``max_loss``.

        Raises:
            ModelError: if an output's number of elements differs from the reference's.
        """
        device = model_device(model)
        total = 0.0
        with torch.no_grad():
            for index, (batch, reference) in enumerate(
                zip(self.inputs, self.reference_outputs, strict=True)
            ):
                output = first_tensor(call_model(model, to_device(batch, device)))
                if output.numel() != reference.numel():
                    raise ModelError(
                        f"for batch {index} the model returned {output.numel()} values but the "
                        f"reference model returned {reference.numel()}; compare models with the "
                        "same output shape."
                    )
                total += _cosine(output, reference)
        return total / len(self.inputs)
