"""NeuronWeightChangeReinit (TSBD stage 1) as a callback: what it zeroes, stop rules, failure safety, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.backdoor import (
    NeuronWeightChangeReinit,
    clean_unlearning,
    find_neuron_layers,
    neuron_weight_changes,
    select_reinit_weights,
)
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.resume import quiet_trainer


def clean_data(n: int = 64) -> TensorDataset:
    x, y = load_digits_tensors(8)
    return TensorDataset(x[:n], y[:n])


def frozen_classifier() -> ImageClassifier:
    """lr 0: training after stage 1 leaves the weights as stage 1 left them."""
    return ImageClassifier(width=4, lr=0.0, momentum=0.0, seed=3)


STAGE1 = {"neuron_ratio": 0.25, "lr_unlearn": 1e-2, "max_unlearn_epochs": 3, "progress_bar": False}


def test_zeroes_exactly_the_functional_selection_on_the_live_model():
    module = frozen_classifier()
    before = copy.deepcopy(module)
    callback = NeuronWeightChangeReinit(**STAGE1)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, DataLoader(clean_data(), batch_size=16))

    # the same computation by hand: unlearn a copy on the same data in the same order, rank, select
    reference = copy.deepcopy(before)
    loader = DataLoader(clean_data(), batch_size=16, shuffle=False)
    epochs, rule = clean_unlearning(reference, loader, lr=1e-2, max_epochs=3)
    layers = find_neuron_layers(before)
    masks, selected = select_reinit_weights(neuron_weight_changes(before, reference, layers), 0.25, 0.7)

    assert callback.done and callback.report["unlearn_epochs"] == epochs and callback.report["stop_rule"] == rule
    assert callback.report["selected_neurons"] == sum(int(s.sum()) for s in selected.values()) == int(28 * 0.25)
    live = dict(module.named_modules())
    zeroed = 0
    for layer in layers:
        weight = live[layer.name].weight.detach()
        mask = layer.from_per_neuron(masks[layer.name])
        assert torch.all(weight[mask] == 0)
        assert torch.equal(weight[~mask], layer.weight.detach()[~mask])  # everything else untouched
        zeroed += int(mask.sum())
    assert zeroed == callback.report["zeroed_weights"] > 0
    assert torch.equal(module.model.fc.weight, before.model.fc.weight)  # Linear is not a default neuron layer


def test_a_failing_clean_loader_leaves_the_weights_untouched():
    class Boom(DataLoader):
        def __iter__(self):
            yield next(iter(DataLoader(clean_data(), batch_size=16)))
            raise RuntimeError("disk error")

    module = frozen_classifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = NeuronWeightChangeReinit(**STAGE1, dataloader=Boom(clean_data()))
    with pytest.raises(RuntimeError, match="disk error"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, DataLoader(clean_data(), batch_size=16))
    assert not callback.done
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_resumed_state_does_not_rerun_stage_one():
    module = frozen_classifier()
    before = {k: v.clone() for k, v in module.named_parameters()}
    callback = NeuronWeightChangeReinit(**STAGE1)
    callback.load_state_dict({"done": True, "report": {"zeroed_weights": 7}})
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, DataLoader(clean_data(), batch_size=16))
    assert all(torch.equal(before[k], v) for k, v in module.named_parameters())  # lr 0 and no zeroing
    assert callback.report == {"zeroed_weights": 7}
    assert NeuronWeightChangeReinit().load_state_dict({}) is None  # old checkpoints: defaults


class Constant(nn.Module):
    """Always predicts class 2, whatever its (trainable) weight does."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 2] = 10.0
        return logits + self.w * 0


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"stop_acc": 1.0}, "accuracy"),
        ({"stop_acc": 0.0}, "single_class"),
        ({"stop_acc": 0.0, "stop_on_single_class": False}, "max_epochs"),
    ],
)
def test_stop_rules(kwargs, rule):
    epochs, fired = clean_unlearning(Constant(), DataLoader(clean_data(), batch_size=32), max_epochs=2, **kwargs)
    assert fired == rule
    assert epochs == (2 if rule == "max_epochs" else 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neuron_ratio": 0.0}, "neuron_ratio"),
        ({"subweight_ratio": 1.5}, "subweight_ratio"),
        ({"unlearn_stop_acc": -0.1}, "unlearn_stop_acc"),
        ({"lr_unlearn": 0.0}, "lr_unlearn"),
        ({"max_unlearn_epochs": 0}, "max_unlearn_epochs"),
        ({"layer_types": ("rnn",)}, "layer_types"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronWeightChangeReinit(**kwargs)


def test_model_without_eligible_layer_fails_at_setup():
    callback = NeuronWeightChangeReinit(layer_types=("hf_conv1d",))
    with pytest.raises(ValueError, match="no eligible layer"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(frozen_classifier(), DataLoader(clean_data()))


def test_empty_clean_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        clean_unlearning(Constant(), [], max_epochs=1)
