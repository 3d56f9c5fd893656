"""``neuron_ratio="auto"``: TSBD's neuron ratio chosen from clean data only (folds, the rule, the callback)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_ft.backdoor.calibration as calibration
from lightning_ft.backdoor import NeuronWeightChangeReinit, find_neuron_layers, tsbd
from lightning_ft.backdoor.calibration import DEFAULT_CANDIDATES, calibrate_neuron_ratio, clean_folds
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.resume import quiet_trainer

AUTO = {"lr_unlearn": 1e-2, "max_unlearn_epochs": 3, "progress_bar": False, "calibration_epochs": 1}


def clean_data(n: int = 48) -> TensorDataset:
    x, y = load_digits_tensors(8)
    return TensorDataset(x[:n], y[:n])


def changes_for(n_neurons: int) -> dict[str, torch.Tensor]:
    return {"a": torch.arange(1.0, n_neurons + 1).unsqueeze(1).repeat(1, 3)}


def test_folds_hold_every_sample_out_once_and_train_on_the_rest():
    data = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    pairs = clean_folds(DataLoader(data, batch_size=4), folds=3, seed=1)
    held = [torch.cat([y for _, y in h]) for _, h in pairs]
    assert sorted(torch.cat(held).tolist()) == list(range(10))  # a partition
    for (train, _), out in zip(pairs, held, strict=True):
        seen = torch.cat([y for _, y in train])
        assert sorted(seen.tolist()) == sorted(set(range(10)) - set(out.tolist()))
        assert train.batch_size == 4


@pytest.mark.parametrize(
    ("loader", "folds", "match"),
    [
        ([(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))], 3, "DataLoader over a map-style dataset"),
        (DataLoader(TensorDataset(torch.zeros(2, 1), torch.zeros(2)), batch_size=1), 3, "at least `folds`=3"),
        (DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4)), batch_size=1), 1, "folds"),
    ],
)
def test_folds_refuse_what_they_cannot_split(loader, folds, match):
    with pytest.raises(ValueError, match=match):
        clean_folds(loader, folds)


def _fake_repair(monkeypatch, accuracy_of_neurons):
    """Replace the repair probe by a table: repaired accuracy as a function of the number of selected neurons."""
    tried = []

    def fake(model, edit, folds, epochs, optimizer, context):
        selected = edit.size
        tried.append(selected)
        return round(1000 * accuracy_of_neurons(selected)), 1000  # (correct, total) held-out predictions

    monkeypatch.setattr(calibration, "repaired_counts", fake)
    return tried


def _calibrate(**kwargs):
    model = torch.nn.Linear(1, 2)
    with torch.no_grad():  # predicts class 0 for the all-zero inputs, whose labels are 0: reference accuracy 1.0
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))
    loader = DataLoader(TensorDataset(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long)), batch_size=2)
    return calibrate_neuron_ratio(model, changes_for(100), loader, lambda m: [], subweight_ratio=1.0, **kwargs)


def test_rule_takes_the_largest_ratio_before_the_first_miss(monkeypatch):
    tried = _fake_repair(monkeypatch, lambda n: {1: 1.0, 2: 1.0, 5: 0.99, 10: 0.97, 20: 0.90, 30: 0.99}.get(n, 0.0))
    result = _calibrate(max_acc_drop=0.04)
    assert result.reference_acc == 1.0
    # 0.01..0.1 within 0.04 of 1.0; 0.2 misses and the scan stops (0.3 passing again is not tried)
    assert result.ratio == 0.1 and result.rule == "largest_within_budget"
    assert tried == [1, 2, 5, 10, 20]
    assert [row["within_budget"] for row in result.candidates] == [True, True, True, True, False]
    assert result.candidates[-1]["drop"] == pytest.approx(0.10)
    assert _calibrate(max_acc_drop=1.0).ratio == 0.5  # a budget of everything takes the largest


def test_rule_falls_back_to_the_smallest_ratio_and_says_so(monkeypatch):
    tried = _fake_repair(monkeypatch, lambda n: 0.5)
    result = _calibrate(max_acc_drop=0.1)
    assert (result.ratio, result.rule, tried) == (0.01, "none_within_budget", [1])


def test_ratios_that_select_the_same_neurons_are_tried_once(monkeypatch):
    tried = _fake_repair(monkeypatch, lambda n: 1.0)
    model = torch.nn.Linear(1, 2)
    loader = DataLoader(TensorDataset(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long)), batch_size=2)
    # 10 neurons: 0.01 and 0.02 select none (skipped), 0.1 and 0.15 both select one (0.1 stands for both)
    candidates = (0.01, 0.02, 0.1, 0.15, 0.5)
    result = calibrate_neuron_ratio(
        model, changes_for(10), loader, lambda m: [], subweight_ratio=1.0, candidates=candidates, max_acc_drop=1
    )
    assert tried == [1, 5] and result.ratio == 0.5
    assert [row["ratio"] for row in result.candidates] == [0.1, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ()}, "candidates"),
        ({"candidates": (0.0, 0.1)}, "candidates"),
        ({"max_acc_drop": 1.5}, "max_acc_drop"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_calibration_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _calibrate(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neuron_ratio": "best"}, "'auto'"),
        ({"calibration_candidates": [0.1, 2.0]}, "calibration_candidates"),
        ({"max_acc_drop": -0.1}, "max_acc_drop"),
        ({"calibration_folds": 1}, "calibration_folds"),
        ({"calibration_epochs": 0}, "calibration_epochs"),
    ],
)
def test_callback_checks_calibration_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronWeightChangeReinit(**kwargs)


def test_auto_is_the_default_of_both_entry_points():
    assert NeuronWeightChangeReinit().neuron_ratio == "auto"
    assert tsbd()[0].neuron_ratio == "auto"
    assert tuple(NeuronWeightChangeReinit().calibration_candidates) == DEFAULT_CANDIDATES


def test_callback_zeroes_the_selection_of_the_ratio_it_chose_and_reports_the_candidates():
    module = ImageClassifier(width=4, lr=0.0, momentum=0.0, seed=3)  # lr 0: the fit leaves stage 1's weights
    before = copy.deepcopy(module)
    callback = NeuronWeightChangeReinit(**AUTO)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, DataLoader(clean_data(), batch_size=16))

    report = callback.report
    rows = report["calibration"]
    assert callback.calibration is not None and report["neuron_ratio"] == callback.calibration.ratio
    assert [row["ratio"] for row in rows] == sorted(row["ratio"] for row in rows)
    passed = [row["ratio"] for row in rows if row["within_budget"]]
    if report["calibration_rule"] == "largest_within_budget":
        assert report["neuron_ratio"] == passed[-1]
        assert all(rows[i]["within_budget"] for i in range(len(passed)))  # the scan stops at the first miss
    else:
        assert not passed and report["neuron_ratio"] == rows[0]["ratio"]
    # the zeroed weights are the selection at the chosen ratio
    layers = find_neuron_layers(before)
    zeroed = sum(int((dict(module.named_modules())[layer.name].weight == 0).sum()) for layer in layers)
    assert zeroed == report["zeroed_weights"] > 0
    assert report["selected_neurons"] == int(report["neurons"] * report["neuron_ratio"])


def test_probes_use_the_fits_optimizer(monkeypatch):
    built = []
    original = calibration.repaired_counts

    def spy(model, edit, folds, epochs, optimizer, context):
        built.append((optimizer(torch.nn.Linear(1, 1).parameters()), epochs))
        return original(model, edit, folds, epochs, optimizer, context)

    monkeypatch.setattr(calibration, "repaired_counts", spy)
    module = ImageClassifier(width=4, lr=0.123, momentum=0.5, seed=3)
    callback = NeuronWeightChangeReinit(**{**AUTO, "calibration_epochs": None, "calibration_candidates": [0.1]})
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(module, DataLoader(clean_data(), batch_size=16))
    optimizer, epochs = built[0]
    assert isinstance(optimizer, torch.optim.SGD) and epochs == 2  # the fit's max_epochs
    assert optimizer.defaults["lr"] == 0.123 and optimizer.defaults["momentum"] == 0.5


def test_resume_keeps_the_calibrated_selection_and_refuses_another_rule():
    callback = NeuronWeightChangeReinit(**AUTO)
    state = {"done": True, "report": {"neuron_ratio": 0.1}, "arguments": callback._selection_arguments()}
    NeuronWeightChangeReinit(**AUTO).load_state_dict(state)  # same auto rule: accepted
    with pytest.raises(ValueError, match="neuron_ratio"):
        NeuronWeightChangeReinit(**{**AUTO, "neuron_ratio": 0.1}).load_state_dict(state)
    with pytest.raises(ValueError, match="max_acc_drop"):
        NeuronWeightChangeReinit(**AUTO, max_acc_drop=0.2).load_state_dict(state)


def test_auto_needs_a_splittable_clean_loader():
    module = ImageClassifier(width=4, seed=3)
    batches = [(x.unsqueeze(0), y.unsqueeze(0)) for x, y in clean_data(8)]
    with pytest.raises(ValueError, match="map-style dataset"):
        NeuronWeightChangeReinit(**AUTO).apply(module, batches)


def test_apply_calibrates_without_a_trainer():
    module = ImageClassifier(width=4, seed=3)
    before = copy.deepcopy(module)
    report = NeuronWeightChangeReinit(**AUTO).apply(module, DataLoader(clean_data(), batch_size=16))
    assert report["neuron_ratio"] in DEFAULT_CANDIDATES and report["calibration"]
    assert any(not torch.equal(a, b) for a, b in zip(module.parameters(), before.parameters(), strict=True))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_auto_calibration_under_bf16(precision):
    # the probes are float32 working copies of a bf16-true model (no bf16 context for them); bf16-mixed autocasts
    module = ImageClassifier(width=4, lr=0.0, momentum=0.0, seed=3)
    callback = NeuronWeightChangeReinit(**AUTO)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], precision=precision)
    trainer.fit(module, DataLoader(clean_data(), batch_size=16))
    report = callback.report
    assert report["neuron_ratio"] in DEFAULT_CANDIDATES and report["zeroed_weights"] > 0
    assert all(0.0 <= row["repaired_acc"] <= 1.0 for row in report["calibration"])
