"""Evaluators and models that misbehave on purpose, for the fault tests (and job files).

Faults are switched on by a *flag file* rather than by constructor arguments, so the job
file (and therefore the journal fingerprint) is identical between the failing run and the
resumed one, exactly as when a real evaluator crashes once and is rerun.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from jobhelpers import TinyEvaluator as _Tiny
from torch import nn

__all__ = ["CrashingEvaluator", "BlockingEvaluator", "NoisyEvaluator", "ModeRecorder",
           "nested_mixed_mode_model", "model_modes"]


class CrashingEvaluator(_Tiny):
    """A `TinyEvaluator` that raises in trial k while `fail_flag` holds the number k."""

    def __init__(self, fail_flag: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_flag = Path(fail_flag)
        self.evaluations = 0

    def evaluate(self, model: nn.Module) -> float:
        index, self.evaluations = self.evaluations, self.evaluations + 1
        if self.fail_flag.exists() and index == int(self.fail_flag.read_text()):
            raise RuntimeError(f"simulated crash in evaluation {index}")
        return super().evaluate(model)


class BlockingEvaluator(_Tiny):
    """A `TinyEvaluator` whose evaluation number `block_at` hangs until `release` is set
    (or `hang` seconds pass): a stuck data loader or a dead remote service."""

    def __init__(self, block_at: int, hang: float = 30.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.block_at, self.hang = block_at, hang
        self.release = threading.Event()
        self.evaluations = 0

    def evaluate(self, model: nn.Module) -> float:
        index, self.evaluations = self.evaluations, self.evaluations + 1
        if index == self.block_at:
            self.release.wait(self.hang)
        return super().evaluate(model)


class NoisyEvaluator(_Tiny):
    """A `TinyEvaluator` whose metric drifts by `noise` per call (an unseeded data sampler)."""

    def __init__(self, noise: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise = noise
        self.evaluations = 0

    def evaluate(self, model: nn.Module) -> float:
        self.evaluations += 1
        return super().evaluate(model) - self.noise * self.evaluations


class ModeRecorder(_Tiny):
    """A `TinyEvaluator` that records, per call, whether any module was in training mode."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.saw_training: list[bool] = []

    def calibration(self, model: nn.Module) -> None:
        self.saw_training.append(any(m.training for m in model.modules()))
        super().calibration(model)

    def evaluate(self, model: nn.Module) -> float:
        self.saw_training.append(any(m.training for m in model.modules()))
        return super().evaluate(model)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.inner = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.drop(self.fc(x)))


def nested_mixed_mode_model() -> nn.Module:
    """8 -> 16 -> ... -> 4 with Dropout and BatchNorm, nested two deep, in *mixed* modes:
    the root in train(), one nested block in eval(), one BatchNorm back in train()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Block(), _Block(), nn.Linear(16, 4))
    model.train()
    model[1].eval()
    model[1].inner[1].train()
    return model


def model_modes(model: nn.Module) -> dict[str, bool]:
    """``{qualified name: training}`` of every module."""
    return {name: m.training for name, m in model.named_modules()}
