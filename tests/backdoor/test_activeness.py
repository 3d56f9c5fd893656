"""TSBD stage 2: the gradient mix (alpha 0 / 1, quadratic closed form, norms), exact restoration, per-neuron gradient
clipping, the callback in both modes."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.backdoor import (
    ActivenessAwareFineTuning,
    activeness_aware_gradients_,
    clip_neuron_gradients_,
    find_neuron_layers,
)
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier, SmallBNCNN
from tests.helpers.resume import quiet_trainer


def bn_cnn_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallBNCNN(width=4).double()
    x, y = load_digits_tensors(8)
    return model, x[:16].double(), y[:16]


def loss_of(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def plain_grads(model, x, y):
    model.zero_grad()
    loss_of(model, x, y)().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_alpha_zero_keeps_the_plain_gradient_exactly():
    model, x, y = bn_cnn_batch()
    g = plain_grads(model, x, y)
    activeness_aware_gradients_(model, loss_of(model, x, y), alpha=0.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(g, model.parameters(), strict=True))


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_alpha_one_is_the_gradient_at_the_perturbed_point(norm):
    model, x, y = bn_cnn_batch()
    g = plain_grads(model, x, y)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        total = torch.sqrt(sum((t**2).sum() for t in g))
        for p, t in zip(reference.parameters(), g, strict=True):
            p.add_(0.05 * t / ((t.norm() if norm == "per_tensor" else total) + 1e-12))
    expected = plain_grads(reference, x, y)
    activeness_aware_gradients_(model, loss_of(model, x, y), alpha=1.0, r=0.05, norm=norm)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-12)


def test_parameters_and_batchnorm_buffers_are_restored_bit_exactly():
    model, x, y = bn_cnn_batch()
    plain_grads(model, x, y)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    activeness_aware_gradients_(model, loss_of(model, x, y), alpha=0.7, r=0.5)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_quadratic_closed_form():
    """L = 1/2 theta^T A theta: mixed gradient = A theta + alpha r A^2 theta / ||A theta|| exactly."""
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(5, dtype=torch.float64))
    holder = nn.Module()
    holder.theta = theta

    def loss():
        return 0.5 * holder.theta @ a @ holder.theta

    loss().backward()
    activeness_aware_gradients_(holder, loss, alpha=0.7, r=0.05, eps=0.0)
    g = a @ theta.detach()
    expected = g + 0.7 * 0.05 * (a @ g) / g.norm()
    assert torch.allclose(theta.grad, expected, atol=1e-12)


def test_zero_and_missing_gradients_are_safe():
    holder = nn.Module()
    holder.used = nn.Parameter(torch.ones(3))
    holder.frozen = nn.Parameter(torch.ones(3))  # no .grad: skipped
    holder.used.grad = torch.zeros(3)
    activeness_aware_gradients_(holder, lambda: (holder.used**2).sum(), alpha=0.5)
    assert torch.isfinite(holder.used.grad).all() and holder.frozen.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"r": 0.0}, "`r`"),
        ({"norm": "l1"}, "norm"),
        ({"mode": "sam"}, "mode"),
        ({"clip_factor": 0.0}, "clip_factor"),
        ({"clip_factor": True}, "clip_factor"),
        ({"layer_types": ("bn",)}, "layer_types"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivenessAwareFineTuning(**kwargs)


def digits_loader():
    x, y = load_digits_tensors(8)
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)


class Recorder(pl.Callback):
    """Checks, at each optimizer step, that the callback replaced the plain gradient."""

    def __init__(self) -> None:
        self.changed = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.changed.append(any(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.parameters()))


def test_callback_runs_once_per_optimizer_step_and_changes_the_update():
    torch.manual_seed(0)
    plain, mixed = ImageClassifier(width=4, seed=1), ImageClassifier(width=4, seed=1)
    quiet_trainer(max_epochs=1).fit(plain, digits_loader())
    callback = ActivenessAwareFineTuning(alpha=0.7, r=0.5)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(mixed, digits_loader())
    assert callback.steps == 4
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), mixed.parameters(), strict=True))
    assert diff > 1e-4, "the activeness-aware update must differ from plain SGD"
    restored = ActivenessAwareFineTuning(alpha=0.7, r=0.5)
    restored.load_state_dict(callback.state_dict())
    assert restored.steps == 4


def test_gradient_accumulation_is_refused():
    trainer = quiet_trainer(max_epochs=1, callbacks=[ActivenessAwareFineTuning()], accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(ImageClassifier(width=4), digits_loader())


def _neuron_norms(layer):
    squared = layer.per_neuron(layer.weight.grad).pow(2).sum(1)
    bias = layer.module.bias
    return (squared + bias.grad.pow(2)).sqrt() if bias is not None else squared.sqrt()


@pytest.mark.parametrize("clip_factor", [0.5, 1.0, 2.0])
def test_clip_caps_each_neuron_at_a_multiple_of_its_layer_median(clip_factor):
    model, x, y = bn_cnn_batch()
    plain_grads(model, x, y)
    layers = find_neuron_layers(model, ("conv", "linear"))
    norms_before = [_neuron_norms(layer) for layer in layers]
    rows_before = [layer.per_neuron(layer.weight.grad).clone() for layer in layers]
    others_before = {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d)
    }
    clipped = clip_neuron_gradients_(layers, clip_factor)
    expected_clipped = 0
    for layer, norms, rows in zip(layers, norms_before, rows_before, strict=True):
        cap = clip_factor * norms.median()
        torch.testing.assert_close(_neuron_norms(layer), torch.minimum(norms, cap))
        expected_clipped += int((norms > cap).sum())
        # only the scale changes: every neuron's gradient keeps its direction
        cosine = nn.functional.cosine_similarity(layer.per_neuron(layer.weight.grad), rows, dim=1)
        assert torch.all(cosine > 1 - 1e-9)
    assert int(clipped) == expected_clipped > 0
    assert len(others_before) == 6
    for name, grad in others_before.items():  # BatchNorm parameters are not neurons: untouched
        assert torch.equal(model.get_parameter(name).grad, grad), name


def test_clip_scales_weight_rows_and_bias_together_in_every_layout():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    layer.weight.grad = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    layer.bias.grad = torch.tensor([0.0, 0.0, 0.0, 0.0])
    (found,) = find_neuron_layers(layer, ("linear",), exclude=())
    clip_neuron_gradients_([found], 1.0)  # norms 5, 1, 1, 2: median (lower) 1
    torch.testing.assert_close(layer.weight.grad.norm(dim=1), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(layer.weight.grad[0], torch.tensor([0.6, 0.8, 0.0]))

    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv1d = Conv1D(4, 3)  # weight (in, out): neurons are columns
    conv1d.weight.grad = layer.weight.grad.new_tensor(
        [[3.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0]]
    )
    conv1d.bias.grad = torch.zeros(4)
    (found,) = find_neuron_layers(conv1d, ("hf_conv1d",), exclude=())
    clip_neuron_gradients_([found], 1.0)
    torch.testing.assert_close(conv1d.weight.grad.norm(dim=0), torch.ones(4))


def test_clip_skips_layers_without_gradient_and_counts_nothing():
    model = SmallBNCNN(width=4)
    assert int(clip_neuron_gradients_(find_neuron_layers(model), 1.0)) == 0


def test_clip_mode_callback_changes_the_update_with_no_extra_forward():
    torch.manual_seed(0)
    plain, clipped = ImageClassifier(width=4, seed=1), ImageClassifier(width=4, seed=1)
    quiet_trainer(max_epochs=1).fit(plain, digits_loader())
    forwards = []
    clipped.model.register_forward_hook(lambda *args: forwards.append(1))
    callback = ActivenessAwareFineTuning(mode="clip", clip_factor=1.0)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(clipped, digits_loader())
    assert callback.steps == 4
    assert len(forwards) == 4, "clip mode must not add forward passes"
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), clipped.parameters(), strict=True))
    assert diff > 1e-4, "clipping must change the update"


def test_clip_mode_accepts_gradient_accumulation():
    callback = ActivenessAwareFineTuning(mode="clip")
    quiet_trainer(max_epochs=1, callbacks=[callback], accumulate_grad_batches=2).fit(
        ImageClassifier(width=4), digits_loader()
    )
    assert callback.steps == 2


def test_clip_mode_without_eligible_layer_fails_at_setup():
    callback = ActivenessAwareFineTuning(mode="clip", layer_types=("hf_conv1d",))
    with pytest.raises(ValueError, match="no eligible layer"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(ImageClassifier(width=4), digits_loader())
