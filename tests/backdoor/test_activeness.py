"""TSBD stage 2: the gradient mix (alpha 0 / 1, quadratic closed form, norms), exact restoration, the callback."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.backdoor import ActivenessAwareFineTuning, activeness_aware_gradients_
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
    ("kwargs", "match"), [({"alpha": 1.5}, "alpha"), ({"r": 0.0}, "`r`"), ({"norm": "l1"}, "norm")]
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
