"""Tests for the ready-made evaluators: ClassificationEvaluator and FidelityEvaluator."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoquant.errors import ConfigError, ModelError
from autoquant.evaluators import ClassificationEvaluator, Evaluator, FidelityEvaluator
from tests.helpers.synthetic import OneDict


def _identity_linear() -> nn.Linear:
    """Linear(2, 2) with identity weight and zero bias: predicts argmax of the input."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    return layer.eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Predictions are the argmax of each row: [0, 1, 0] then [1, 0].
    return [
        (torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 1, 1])),
        (torch.tensor([[0.0, 3.0], [5.0, 4.0]]), torch.tensor([1, 1])),
    ]


class _Counter:
    """Forward-pre hook recording the first input value of every call."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: list[float] = []
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.seen.append(float(args[0].reshape(-1)[0]))


class _PairModel(nn.Module):
    """Takes two tensors: logits = lin(a) + b."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = _identity_linear()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(a) + b


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))


# ----------------------------------------------------------------- ClassificationEvaluator


def test_accuracy_matches_hand_computed_value() -> None:
    evaluator = ClassificationEvaluator(_batches())
    value = evaluator.evaluate(_identity_linear())
    assert isinstance(value, float)
    assert value == pytest.approx(3 / 5)
    assert evaluator.higher_is_better is True
    assert isinstance(evaluator, Evaluator)


def test_subset_metric_is_the_mean_true_class_probability_of_the_calibration_batches():
    evaluator = ClassificationEvaluator(_batches(), calibration_batches=1)
    x, labels = _batches()[0]
    expected = torch.softmax(x.double(), dim=1)[torch.arange(3), labels].mean()
    assert evaluator.evaluate_subset(_identity_linear()) == pytest.approx(float(expected))
    # it ranks layers for sensitivity_scope="subset" without a subclass
    import autoquant as aq

    model = _mlp()
    loader = [(torch.randn(8, 6, generator=torch.Generator().manual_seed(i)),
               torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)))
              for i in range(3)]
    ranking = aq.sensitivity_analysis(model, ClassificationEvaluator(loader, 2),
                                      sensitivity_scope="subset")
    assert {r.name for r in ranking} == {"0", "3"}


def test_the_default_ranking_skips_the_subset_proxy_but_uses_a_subclass_subset_metric():
    import autoquant as aq

    model = _mlp()
    loader = [(torch.randn(8, 6, generator=torch.Generator().manual_seed(i)),
               torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)))
              for i in range(3)]

    class Counted(ClassificationEvaluator):
        calls = 0

        def evaluate_subset(self, model):  # the metric itself, on one batch
            Counted.calls += 1
            return ClassificationEvaluator(self.loader[:1]).evaluate(model)

    proxy = aq.sensitivity_analysis(model, ClassificationEvaluator(loader, 2))
    assert {r.scope for r in proxy} == {"gradient"}
    own = aq.sensitivity_analysis(model, Counted(loader, 2))
    assert {r.scope for r in own} == {"subset"} and Counted.calls == 3


def test_accuracy_with_dataloader_is_reiterable() -> None:
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    evaluator = ClassificationEvaluator(loader)
    assert evaluator.evaluate(_identity_linear()) == pytest.approx(0.6)
    assert evaluator.evaluate(_identity_linear()) == pytest.approx(0.6)


def test_tuple_output_uses_first_tensor() -> None:
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = _identity_linear()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), -self.lin(x)

    assert ClassificationEvaluator(_batches()).evaluate(WithAux()) == pytest.approx(0.6)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_calibration_runs_exactly_first_n_batches(n: int) -> None:
    loader = [(torch.full((2, 2), float(i)), torch.zeros(2, dtype=torch.long)) for i in range(6)]
    model = _identity_linear()
    counter = _Counter(model)
    ClassificationEvaluator(loader, calibration_batches=n).calibration(model)
    assert counter.seen == [float(i) for i in range(n)]


def test_calibration_with_fewer_batches_than_requested_runs_them_all() -> None:
    model = _identity_linear()
    counter = _Counter(model)
    ClassificationEvaluator(_batches(), calibration_batches=10).calibration(model)
    assert len(counter.seen) == 2


def test_tuple_inputs_are_unpacked() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 5.0], [0.0, 0.0], [0.0, 0.0]])  # flips the first prediction to 1
    loader = [((a, b), torch.tensor([1, 0, 0]))]  # predictions [1, 0, 1] -> 2 of 3
    evaluator = ClassificationEvaluator(loader, calibration_batches=1)
    model = _PairModel().eval()
    assert evaluator.evaluate(model) == pytest.approx(2 / 3)
    evaluator.calibration(model)


def test_model_without_parameters_runs_on_cpu_and_explicit_device() -> None:
    loader = [(torch.tensor([[0.0, 1.0], [3.0, 1.0]]), torch.tensor([1, 1]))]
    assert ClassificationEvaluator(loader).evaluate(nn.Identity()) == pytest.approx(0.5)
    assert ClassificationEvaluator(loader, device="cpu").evaluate(nn.Identity()) == 0.5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", None])
def test_bad_calibration_batches_raise_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="calibration_batches"):
        ClassificationEvaluator(_batches(), calibration_batches=bad)  # type: ignore[arg-type]


def test_one_shot_iterator_and_non_iterable_loader_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="one-shot iterator"):
        ClassificationEvaluator(iter(_batches()))
    with pytest.raises(ConfigError, match="iterable"):
        ClassificationEvaluator(42)  # type: ignore[arg-type]


def test_bad_device_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="device"):
        ClassificationEvaluator(_batches(), device="not-a-device")


def test_empty_loader_raises_config_error_at_use() -> None:
    evaluator = ClassificationEvaluator([])
    with pytest.raises(ConfigError, match="at least one"):
        evaluator.evaluate(_identity_linear())
    with pytest.raises(ConfigError, match="at least one"):
        evaluator.calibration(_identity_linear())


def test_malformed_batch_raises_config_error() -> None:
    evaluator = ClassificationEvaluator([torch.zeros(2, 2)])
    with pytest.raises(ConfigError, match=r"\(inputs, labels\)"):
        evaluator.evaluate(_identity_linear())


# ----------------------------------------------------------------------- FidelityEvaluator


def test_fidelity_is_one_for_reference_and_below_for_perturbed_copy() -> None:
    model = _mlp()
    inputs = [torch.randn(5, 6), torch.randn(3, 6)]
    evaluator = FidelityEvaluator(model, inputs)
    assert evaluator.higher_is_better is True
    model.eval()  # autoquant evaluates in eval mode; dropout is then off, as for the reference
    value = evaluator.evaluate(model)
    assert isinstance(value, float)
    assert value == pytest.approx(1.0, abs=1e-6)

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(0.3 * torch.randn_like(param))
    score = evaluator.evaluate(perturbed)
    assert -1.0 <= score < 1.0 - 1e-4


def test_fidelity_does_not_mutate_reference_model() -> None:
    model = _mlp()
    model.train()
    model[2].eval()  # a mixed state must come back exactly as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    FidelityEvaluator(model, [torch.randn(4, 6)])
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert all(p.grad is None for p in model.parameters())


def test_fidelity_reference_outputs_use_eval_mode() -> None:
    model = _mlp().train()  # dropout active in train mode
    x = torch.randn(8, 6)
    evaluator = FidelityEvaluator(model, [x])
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.allclose(evaluator.reference_outputs[0], expected)
    assert not evaluator.reference_outputs[0].requires_grad


def test_fidelity_tuple_inputs_and_tuple_outputs() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
            return self.lin(a) * b, "aux"

    model = Pair().eval()
    inputs = [(torch.randn(4, 2), torch.randn(4, 3))]
    assert FidelityEvaluator(model, inputs).evaluate(model) == pytest.approx(1.0, abs=1e-6)


def test_fidelity_calibration_uses_calibration_inputs_or_inputs() -> None:
    model = _mlp().eval()
    inputs = [torch.full((2, 6), 1.0), torch.full((2, 6), 2.0)]
    calib = [torch.full((2, 6), 7.0)]

    counter = _Counter(model)
    FidelityEvaluator(model, inputs).calibration(model)
    assert counter.seen[-2:] == [1.0, 2.0]

    counter.seen.clear()
    evaluator = FidelityEvaluator(model, inputs, calibration_inputs=calib)
    counter.seen.clear()  # construction ran the reference pass
    evaluator.calibration(model)
    assert counter.seen == [7.0]


def test_fidelity_sign_flip_gives_minus_one() -> None:
    model = nn.Linear(3, 3)
    evaluator = FidelityEvaluator(model, [torch.randn(2, 3)])
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for param in flipped.parameters():
            param.neg_()
    assert evaluator.evaluate(flipped) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(
    "inputs",
    [[], torch.randn(2, 6), [torch.randn(2, 6), "x"], [()], "abc", None],
)
def test_fidelity_bad_inputs_raise_config_error(inputs: object) -> None:
    with pytest.raises(ConfigError, match="inputs"):
        FidelityEvaluator(_mlp(), inputs)  # type: ignore[arg-type]


def test_fidelity_bad_calibration_inputs_and_reference_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="calibration_inputs"):
        FidelityEvaluator(_mlp(), [torch.randn(2, 6)], calibration_inputs=[])
    with pytest.raises(ConfigError, match="reference_model"):
        FidelityEvaluator(lambda x: x, [torch.randn(2, 6)])  # type: ignore[arg-type]


class _HFStyle(nn.Module):
    """Takes keyword inputs and returns a dict whose 'logits' entry is not the first value,
    as a Hugging Face model returning a ModelOutput does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = _identity_linear()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        logits = self.proj(input_ids * attention_mask)
        return {"hidden_states": (logits * 100.0,), "logits": logits}


def test_dict_inputs_are_keywords_and_dict_outputs_are_read_on_their_logits() -> None:
    loader = [({"input_ids": x, "attention_mask": torch.ones_like(x)}, y)
              for x, y in _batches()]
    assert ClassificationEvaluator(loader).evaluate(_HFStyle()) == pytest.approx(3 / 5)
    reference = _HFStyle()
    inputs = [batch for batch, _ in loader]
    fidelity = FidelityEvaluator(reference, inputs)
    assert fidelity.evaluate(reference) == pytest.approx(1.0)
    flipped = copy.deepcopy(reference)
    with torch.no_grad():
        flipped.proj.weight.mul_(-1)
    assert fidelity.evaluate(flipped) == pytest.approx(-1.0)


def test_nested_tuple_outputs_are_searched_in_order_and_a_tensorless_output_is_named() -> None:
    class Nested(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple:
            return (None, ((x * 2.0,), x))

    batches = [(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))]
    assert ClassificationEvaluator(batches).evaluate(Nested()) == 1.0

    class NoTensor(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"note": "no tensor"}

    with pytest.raises(ModelError, match=r"returned dict .*no tensor in it.*'logits'"):
        ClassificationEvaluator(batches).evaluate(NoTensor())


def test_a_forward_that_takes_one_dict_gets_each_dict_batch_whole() -> None:
    model = OneDict().eval()
    inputs = [{"x": torch.randn(5, 3), "y": torch.randn(5, 4)} for _ in range(2)]
    fidelity = FidelityEvaluator(model, inputs)
    assert fidelity.evaluate(model) == pytest.approx(1.0)
    with torch.no_grad():
        expected = model(inputs[0])
    assert torch.equal(fidelity.reference_outputs[0], expected)
