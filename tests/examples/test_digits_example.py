"""The digits example trains to a useful accuracy quickly and deterministically."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from examples.digits.model import DigitsCNN, build_model, load_data, make_loaders  # noqa: E402
from examples.digits.train import accuracy, save_checkpoint, train  # noqa: E402


def test_data_split_is_fixed_and_well_formed() -> None:
    a, b = load_data(seed=0), load_data(seed=0)
    images, labels = a.val
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 8, 8)
    assert labels.dtype == torch.int64
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[1], b.train[1])
    assert len(a.train[1]) + len(a.val[1]) == 1797
    train_loader, val_loader = make_loaders(batch_size=64)
    assert sum(len(y) for _, y in val_loader) == len(labels)
    assert sum(len(y) for _, y in train_loader) == len(a.train[1])


def test_model_has_enough_quantizable_layers() -> None:
    layers = [m for m in DigitsCNN().modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) >= 5


def test_short_training_reaches_90_percent_and_checkpoint_round_trips(tmp_path) -> None:
    model = train(epochs=3, seed=0)
    images, labels = load_data(seed=0).val
    acc = accuracy(model, images, labels)
    assert acc >= 0.9, f"val accuracy {acc:.3f} after 3 epochs"

    path = save_checkpoint(model, tmp_path / "sub" / "digits.pt")
    loaded = build_model(str(path))
    assert not loaded.training
    assert accuracy(loaded, images, labels) == acc
