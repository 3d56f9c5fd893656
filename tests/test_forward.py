"""The shared forward/loss helpers every callback uses for its own forward passes (lightning_ft._internal.forward)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lightning_ft._internal.forward import cast_inputs, logits_of, model_logits, model_loss


@pytest.mark.parametrize(
    "output",
    [
        torch.ones(2, 3),
        {"logits": torch.ones(2, 3)},
        SequenceClassifierOutput(logits=torch.ones(2, 3)),
        (torch.ones(2, 3), torch.zeros(1)),
    ],
    ids=["tensor", "dict", "model_output", "tuple"],
)
def test_logits_of_every_output_kind(output):
    assert torch.equal(logits_of(output), torch.ones(2, 3))


def test_logits_of_unknown_output_is_a_clear_error():
    with pytest.raises(TypeError, match=r"got a dict with keys \['loss'\]"):
        logits_of({"loss": torch.zeros(())})


def test_cast_inputs_casts_floating_tensors_only():
    batch = (torch.zeros(2, 3), torch.tensor([1, 2]), {"mask": torch.ones(2, dtype=torch.long), "x": torch.ones(1)})
    out = cast_inputs(batch, torch.device("cpu"), torch.bfloat16)
    assert isinstance(out, tuple)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.long
    assert out[2]["mask"].dtype == torch.long and out[2]["x"].dtype == torch.bfloat16


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.seen: list[Any] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def test_model_logits_casts_to_a_bf16_model():
    net = _Net().to(torch.bfloat16)
    assert model_logits(net, torch.zeros(2, 3)).dtype == torch.bfloat16


def test_model_loss_hands_the_hook_the_batch_in_the_models_dtype():
    class WithLoss(_Net):
        def lightning_ft_loss(self, batch: Any) -> Tensor:
            self.seen.append(batch)
            return self(batch[0]).float().sum() * 0 + 3.0

    net = WithLoss().to(torch.bfloat16)
    loss, logits, labels = model_loss(net, (torch.zeros(2, 3), torch.tensor([0, 1])))
    assert float(loss) == 3.0 and logits is None and labels is None
    ((x, y),) = net.seen
    assert x.dtype == torch.bfloat16 and y.dtype == torch.long


def test_model_loss_defaults_to_cross_entropy_and_checks_the_hooks_result():
    net = _Net()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    loss, logits, labels = model_loss(net, (x, y))
    assert torch.allclose(loss, nn.functional.cross_entropy(net(x), y))
    assert torch.equal(labels, y) and logits.shape == (5, 4)

    class Bad(_Net):
        def lightning_ft_loss(self, batch: Any) -> Tensor:
            return self(batch[0])

    with pytest.raises(TypeError, match=r"must return a scalar tensor, got Tensor of shape \(5, 4\)"):
        model_loss(Bad(), (x, y))
