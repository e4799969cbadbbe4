"""Calibration quality: entropy and weight-MSE clipping, the automatic per-layer choice,
bias correction, and the config options that switch them on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoquant as aq
from autoquant.calibration.refine import CANDIDATES, SQNR, calibrate_model, candidate_label
from autoquant.config import QuantizerConfig
from autoquant.errors import ConfigError
from autoquant.evaluation.adapter import calibration_of
from autoquant.quant.clipping import entropy_range, mse_weight_range
from autoquant.quant.layers import QuantState
from autoquant.quant.qmodel import QuantModel
from autoquant.quant.quantizer import (
    ActivationObserver,
    compute_qparams,
    fake_quantize,
    qrange,
    weight_qparams,
)


class BatchEvaluator:
    """Calibrates on fixed batches; evaluates as the negative output MSE to the float model."""

    higher_is_better = True

    def __init__(self, batches: list[torch.Tensor], reference: nn.Module) -> None:
        self.batches = batches
        with torch.no_grad():
            self.targets = [reference(x) for x in batches]

    def calibration(self, model: nn.Module) -> None:
        for x in self.batches:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        return -sum(float(F.mse_loss(model(x), t)) for x, t in
                    zip(self.batches, self.targets, strict=True))


def _outlier_mlp(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        x = torch.randn(32, 16, generator=gen)
        x[0, 3] = 40.0  # a rare outlier: min-max wastes the grid on it
        batches.append(x)
    return model, batches


# -- the algorithms against hand-computed cases -----------------------------------------------

def test_weight_mse_clip_matches_hand_computed_optimum() -> None:
    # 99 values of 0.1 and one of 1.0 on a 2-bit signed grid (qmax 1): min-max (scale 1.0)
    # rounds every 0.1 to 0 (MSE 0.0099); scale f in [0.1, 0.2) gives
    # (99 (0.1 - f)^2 + (1 - f)^2) / 100, minimal at f = 0.109; on the 0.01 grid f = 0.11.
    row = torch.full((1, 100), 0.1)
    row[0, -1] = 1.0
    lo, hi = mse_weight_range(row, bits=2, symmetric=True)
    scale, _ = compute_qparams(lo, hi, 2, True)
    assert float(scale) == pytest.approx(0.11, abs=1e-4)
    assert float(hi) == pytest.approx(0.11, abs=1e-6)


def test_weight_mse_never_worse_than_minmax_per_channel() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 64) * torch.linspace(0.1, 3.0, 8).unsqueeze(1)
    weight[2, 5] = 25.0
    qmin, qmax = qrange(4, True)
    errs = {}
    for algo in ("minmax", "mse"):
        cfg = QuantizerConfig(bits=4, symmetric=True, per_channel=True, algorithm=algo)
        scale, zp, qmin, qmax, axis = weight_qparams(weight, 4, cfg, 0)
        errs[algo] = ((fake_quantize(weight, scale, zp, qmin, qmax, axis) - weight) ** 2
                      ).mean(dim=1)
    assert bool((errs["mse"] <= errs["minmax"] + 1e-12).all())
    assert float(errs["mse"].sum()) < float(errs["minmax"].sum())


def test_entropy_keeps_the_range_of_a_constant_and_of_a_uniform_sample() -> None:
    one = torch.ones(1)
    lo, hi = entropy_range(torch.full((1000,), 2.0), 2.0 * one, 2.0 * one, 8, False)
    assert float(hi) == pytest.approx(2.0)  # all mass at the maximum: nothing to clip
    uniform = torch.linspace(0.0, 1.0, 20001)
    lo, hi = entropy_range(uniform, 0 * one, one, 8, False)
    assert float(lo) == 0.0 and float(hi) > 0.95


def test_entropy_clips_rare_far_outliers() -> None:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(20000, generator=gen)
    sample[:5] = 100.0  # 0.025% of the values, 25x the largest Gaussian value
    lo, hi = entropy_range(sample, sample.min().reshape(1), torch.full((1,), 100.0), 8, False)
    assert 2.0 < float(hi) < 6.0 and float(lo) == -float(hi)


def test_percentile_candidate_matches_hand_computed_quantile() -> None:
    obs = ActivationObserver(QuantizerConfig(symmetric=False, algorithm="auto"))
    obs.update(torch.arange(0.0, 101.0))  # 0..100: the 90th percentile is exactly 90
    scale, zp, qmin, qmax, _ = obs.qparams_for(8, "percentile", 90.0)
    assert float(scale) == pytest.approx(90.0 / 255.0)
    assert obs.qparams(8)[0] == pytest.approx(100.0 / 255.0)  # auto before a choice: min-max


# -- the automatic choice -----------------------------------------------------------------------

def _candidate_sqnr(qmodel: QuantModel, batches: list[torch.Tensor]) -> dict[str, dict]:
    """Each layer's output SQNR for every candidate, computed independently of the pass."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in qmodel.layers}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, n=name: inputs[n].append(a[0].detach())) for name, layer in
        qmodel.layers.items()]
    with qmodel.state(QuantState.FLOAT), torch.no_grad():
        for x in batches:
            qmodel.model(x)
    for h in hooks:
        h.remove()
    qmodel.apply_plan(qmodel.quant_plan())
    out = {}
    for name, layer in qmodel.layers.items():
        linear = layer.module
        w_q = layer.quantized_weight()
        out[name] = {}
        for cand in CANDIDATES:
            scale, zp, qmin, qmax, axis = layer.observer.qparams_for(4, *cand)
            acc = SQNR()
            for x in inputs[name]:
                acc.update(linear(x), F.linear(fake_quantize(x, scale, zp, qmin, qmax, axis),
                                               w_q, linear.bias))
            out[name][candidate_label(*cand)] = acc.score()
    return out


def test_auto_choice_is_never_locally_worse_than_any_candidate() -> None:
    model, batches = _outlier_mlp()
    cfg = aq.QuantConfig.from_dict({"default": {"activation": {"algorithm": "auto",
                                                                "bits": 4}}})
    qmodel = QuantModel(model, cfg)
    calibrate_model(qmodel, calibration_of(BatchEvaluator(batches, model)))
    scores = _candidate_sqnr(qmodel, batches)
    for name, layer in qmodel.layers.items():
        chosen = candidate_label(*layer.observer.effective_algorithm())
        best = max(scores[name].values())
        assert scores[name][chosen] >= best - 1e-9, (name, chosen, scores[name])
        assert scores[name][chosen] >= scores[name]["minmax"]
    # the outlier input of the first layer makes min-max a poor choice there
    assert candidate_label(*qmodel.layers["0"].observer.effective_algorithm()) != "minmax"


def _auto_choices(kept_values: int | None, monkeypatch, pass_only: bool = False,
                  kept_layers: int = 64) -> tuple[int, dict[str, dict[str, float]]]:
    """Passes run and per-layer candidate scores of an ``auto`` (and bias-corrected) run."""
    import autoquant.calibration.refine as refine

    if kept_values is not None:
        monkeypatch.setattr(refine, "KEPT_VALUES", kept_values)
    monkeypatch.setattr(refine, "KEPT_LAYERS", kept_layers)
    model, batches = _outlier_mlp()
    cfg = aq.QuantConfig.from_dict({"bias_correction": True, "default": {
        "activation": {"algorithm": "auto", "bits": 4}}})
    qmodel = QuantModel(model, cfg)
    counted = CountingBatches(batches, model)
    if pass_only:  # the observers, then the choice from a pass of its own
        qmodel.calibrate(calibration_of(counted))
        refine.refine_calibration(qmodel, calibration_of(counted))
    else:
        calibrate_model(qmodel, calibration_of(counted))
    assert all(qmodel.layers[n].bias_corrections for n in ("0", "2"))
    return counted.passes, {n: layer.calibration_scores for n, layer in qmodel.layers.items()}


def test_auto_choice_scores_the_observer_pass_rows_without_a_pass_of_its_own(
        monkeypatch) -> None:
    passes, kept = _auto_choices(None, monkeypatch)
    pass_count, measured = _auto_choices(None, monkeypatch, pass_only=True)
    assert (passes, pass_count) == (1, 2)
    for name, scores in measured.items():
        assert kept[name].keys() == scores.keys()
        for label, score in scores.items():
            assert kept[name][label] == pytest.approx(score, abs=1e-4), (name, label)
    # a store over its bound thins its rows evenly and still chooses without a pass
    passes, thinned = _auto_choices(16 * 32, monkeypatch)
    assert passes == 1 and thinned != kept
    assert all(math.isfinite(v) for scores in thinned.values() for v in scores.values())
    # a single row over the bound, or a layer past `KEPT_LAYERS`: the pass scores it
    for values, layers in [(8, 64), (None, 1)]:
        passes, fallback = _auto_choices(values, monkeypatch, kept_layers=layers)
        assert passes == 2
        for name, scores in measured.items():
            assert fallback[name] == pytest.approx(scores, abs=1e-4)


def test_auto_choice_is_recorded_in_final_config_and_report(tmp_path) -> None:
    model, batches = _outlier_mlp()
    evaluator = BatchEvaluator(batches, model)
    result = aq.auto_quantize(
        model, evaluator, (batches[0],), max_loss=1e9,
        config={"default": {"activation": {"algorithm": "auto"}}, "bias_correction": True})
    rows = {row["name"]: row for row in result.to_report()["layers"]}
    for name in ("0", "2"):
        algo = result.config.layer_config(name).activation.algorithm
        assert algo != "auto"
        assert rows[name]["act_calibration"].split(":")[0] == algo
        assert rows[name]["bias_corrected"] is True
    assert result.config.bias_correction is True
    # the saved model (qparams and bias corrections) reloads without calibration data
    result.save(tmp_path)
    reloaded = aq.load_quantized(model, tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(batches[1]), result.model(batches[1]), atol=1e-6)
    assert aq.QuantConfig.load(tmp_path / "quant_config.yaml") == result.config


# -- bias correction ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_correction_removes_a_planted_mean_shift(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(16, 4))
        weight = model[0].weight
        batches = [torch.rand(64, 16) + 1.0 for _ in range(3)]  # mean input ~1.5
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        weight = model[0].weight
        batches = [torch.rand(8, 3, 6, 6) + 1.0 for _ in range(3)]
    with torch.no_grad():
        # 0.3 everywhere, one 1.0 per output channel: a 2-bit grid (qmax 1, scale 1.0)
        # rounds every 0.3 to 0, a systematic shift of the output mean
        weight.fill_(0.3)
        weight.view(weight.shape[0], -1)[:, 0] = 1.0
    model.eval()
    evaluator = BatchEvaluator(batches, model)

    def mean_shift(cfg: dict) -> torch.Tensor:
        qmodel = aq.quantize(model, evaluator, {"default": {
            "weight": {"bits": 2}, "activation": {"bits": 16}}, **cfg})
        with torch.no_grad():
            diffs = [(qmodel(x) - model(x)) for x in batches]
        dim = -1 if kind == "linear" else 1
        stacked = torch.cat([d.transpose(0, dim).reshape(d.shape[dim], -1) for d in diffs], 1)
        return stacked.mean(dim=1)

    before = mean_shift({})
    after = mean_shift({"bias_correction": True})
    assert float(before.abs().min()) > 1.0
    assert float(after.abs().max()) < 1e-3 * float(before.abs().max())


def test_bias_correction_is_per_scheme_and_off_for_float() -> None:
    model, batches = _outlier_mlp()
    cfg = aq.QuantConfig.from_dict({"bias_correction": True, "default": {"fallback": 16}})
    qmodel = QuantModel(model, cfg)
    calibrate_model(qmodel, calibration_of(BatchEvaluator(batches, model)))
    layer = qmodel.layers["0"]
    assert set(layer.bias_corrections) == {"w8a8", "w16a16"}
    qmodel.apply_plan({"0": "w16a16"})
    assert torch.equal(layer.bias_delta, layer.bias_corrections["w16a16"])
    qmodel.apply_plan({})
    assert layer.bias_delta.numel() == 0


class CountingBatches(BatchEvaluator):
    def __init__(self, batches: list[torch.Tensor], reference: nn.Module) -> None:
        super().__init__(batches, reference)
        self.passes = 0

    def calibration(self, model: nn.Module) -> None:
        self.passes += 1
        super().calibration(model)


@pytest.mark.parametrize("smoothing", [None, 0.85])
def test_linear_bias_correction_from_the_input_mean_equals_the_measured_shift_in_one_pass_less(
        smoothing) -> None:
    from autoquant.calibration.refine import refine_calibration

    model, batches = _outlier_mlp()
    cfg = aq.QuantConfig.from_dict({"bias_correction": True, "default": {
        "fallback": 16, "smoothing": smoothing, "weight": {"bits": 4}}})
    direct = QuantModel(model, cfg)
    counted = CountingBatches(batches, model)
    calibrate_model(direct, calibration_of(counted))
    measured = QuantModel(model, cfg)
    calibrate_model(measured, calibration_of(BatchEvaluator(batches, model)))
    refine_calibration(measured, calibration_of(BatchEvaluator(batches, model)))  # the pass
    assert counted.passes == 1  # the observer pass takes smoothing's statistics too
    for name in ("0", "2"):
        got, want = direct.layers[name].bias_corrections, measured.layers[name].bias_corrections
        assert set(got) == set(want) == {"w4a8", "w16a16"}
        assert float(want["w4a8"].abs().max()) > 1e-3  # a shift worth correcting
        for scheme in got:
            torch.testing.assert_close(got[scheme], want[scheme], rtol=1e-4, atol=1e-6)


# -- config ------------------------------------------------------------------------------------

def test_config_round_trips_with_the_new_options(tmp_path) -> None:
    cfg = aq.QuantConfig.from_dict({
        "default": {"weight": {"algorithm": "mse"}, "activation": {"algorithm": "auto"}},
        "layers": {"fc": {"activation": {"algorithm": "entropy"}}},
        "bias_correction": True,
        "smoothing_alpha": 0.5,
    })
    assert aq.QuantConfig.from_yaml(cfg.to_yaml()) == cfg
    for suffix in (".yaml", ".json"):
        assert aq.QuantConfig.load(cfg.save(tmp_path / f"c{suffix}")) == cfg
    assert aq.QuantConfig().bias_correction is False
    assert aq.QuantConfig().smoothing_alpha is None


@pytest.mark.parametrize(("data", "names"), [
    ({"default": {"activation": {"algorithm": "kl"}}},
     ["minmax", "percentile", "mse", "entropy", "auto"]),
    ({"default": {"weight": {"algorithm": "entropy"}}}, ["minmax", "mse"]),
    ({"default": {"activation": {"per_channel": True, "algorithm": "auto"}}}, ["minmax"]),
    ({"smoothing_alpha": 1.5}, ["[0, 1]"]),
    ({"bias_correction": "yes"}, ["bool"]),
])
def test_bad_option_values_are_rejected_with_the_valid_choices(data: dict, names) -> None:
    with pytest.raises(ConfigError) as info:
        aq.QuantConfig.from_dict(data)
    for name in names:
        assert name in str(info.value)


def test_sqnr_is_infinite_for_identical_outputs_and_drops_with_noise() -> None:
    acc = SQNR()
    y = torch.ones(10)
    acc.update(y, y)
    assert acc.score() == math.inf
    acc.update(y, y + 0.1)  # signal 20, noise 0.1 -> 10 log10(200)
    assert acc.score() == pytest.approx(10 * math.log10(200))



def test_sensitivity_ranking_uses_the_chosen_calibration() -> None:
    model, batches = _outlier_mlp()
    evaluator = BatchEvaluator(batches, model)
    auto_cfg = aq.QuantConfig.from_dict({"default": {"activation": {"algorithm": "auto",
                                                                    "bits": 4}}})
    qmodel = QuantModel(model, auto_cfg)
    calibrate_model(qmodel, calibration_of(evaluator))
    from autoquant.calibration.refine import calibration_overrides

    pinned = aq.QuantConfig.from_dict({**auto_cfg.to_dict(),
                                       "layers": calibration_overrides(qmodel)})
    ranked = {r.name: r.score for r in aq.sensitivity_analysis(model, evaluator,
                                                               config=auto_cfg)}
    again = {r.name: r.score for r in aq.sensitivity_analysis(model, evaluator, config=pinned)}
    minmax = {r.name: r.score for r in aq.sensitivity_analysis(
        model, evaluator, config={"default": {"activation": {"bits": 4}}})}
    assert ranked == pytest.approx(again, abs=1e-12)
    assert ranked["0"] != pytest.approx(minmax["0"], abs=1e-9)


class _TokenModel(nn.Module):
    """An embedding (always weight-only) in front of two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids)))).mean(1)


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_auto_calibration_skips_layers_without_calibrated_activations(mode) -> None:
    # an embedding, and every dynamic or weight-only layer, has no calibrated activation
    # range to choose among: auto leaves it alone instead of failing
    torch.manual_seed(0)
    model = _TokenModel().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 20, (4, 5), generator=gen) for _ in range(2)]
    result = aq.auto_quantize(
        model, BatchEvaluator(batches, model), (batches[0],), max_loss=1e9,
        config={"default": {"mode": mode, "activation": {"algorithm": "auto"}}})
    rows = {row["name"]: row for row in result.to_report()["layers"]}
    assert rows["emb"]["act_calibration"] == "none"
    expected = {"static": None, "dynamic": "per batch", "weight_only": "none"}[mode]
    for name in ("fc", "out"):
        if expected is None:  # static: a real choice among the candidates
            assert rows[name]["act_calibration"] in {candidate_label(*c) for c in CANDIDATES}
        else:
            assert rows[name]["act_calibration"] == expected


class _ChunkMLP(nn.Module):
    """Two Linears; ``list(h.chunk(2, -1))`` makes the untraceable twin (fx fails on it)."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.untraceable = untraceable
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.l1(x))
        parts = list(h.chunk(2, -1)) if self.untraceable else [h[..., :16], h[..., 16:]]
        return self.l2(parts[0] * parts[1])


def test_an_untraceable_model_calibrates_as_its_traceable_twin() -> None:
    # its dataflow pass runs the first calibration batch once more, after the observer
    # pass: the statistics that pass gathers (input means, smoothing, kept rows) skip it
    _, batches = _outlier_mlp()
    cfg = aq.QuantConfig.from_dict({"bias_correction": True, "default": {
        "smoothing": 0.85, "activation": {"algorithm": "auto", "bits": 4}}})
    got = {}
    for untraceable in (False, True):
        model = _ChunkMLP(untraceable).eval()
        qmodel = QuantModel(model, cfg)
        assert (qmodel.output_uses is None) == untraceable
        calibrate_model(qmodel, calibration_of(BatchEvaluator(batches, model)))
        got[untraceable] = {n: (layer.bias_corrections, layer.calibration_scores,
                                layer.input_inv) for n, layer in qmodel.layers.items()}
    for name, (bias, scores, inv) in got[False].items():
        bias_u, scores_u, inv_u = got[True][name]
        assert bias and scores and scores_u == pytest.approx(scores, abs=1e-6)
        torch.testing.assert_close(inv_u, inv)
        for scheme in bias:
            torch.testing.assert_close(bias_u[scheme], bias[scheme])
