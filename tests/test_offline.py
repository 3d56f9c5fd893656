"""The working copy of offline phases that train on rank 0 alone (TSBD stage 1, RNP): float32 for low-precision
models, plain BatchNorms instead of SyncBatchNorms (``sync_batchnorm=True`` under DDP would otherwise hang: rank 0's
train-mode SyncBatchNorm forward is a collective the other ranks, waiting in the broadcast, never join), the user's
model untouched; and the forward context that goes with it."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch import nn

from lightning_ft._internal.offline import forward_context, working_copy
from lightning_ft.backdoor import NeuronWeightChangeReinit, ReconstructiveNeuronPruning
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier


def _clean_loader() -> torch.utils.data.DataLoader:
    data = small_digits_datamodule()
    data.setup("fit")
    return torch.utils.data.DataLoader(data.train_dataset, batch_size=32)


def _batchnorm_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _trained_statistics(model: nn.Module) -> nn.Module:
    """``model`` with non-trivial BatchNorm running statistics and affine parameters (to see that a copy keeps them)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(7)
    return model


def test_working_copy_of_a_bf16_sync_batchnorm_model_is_float32_with_plain_batchnorms():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_trained_statistics(tiny_classifier())).to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    work = working_copy(model)
    assert work is not model
    assert _batchnorm_types(model) == {"SyncBatchNorm"}
    assert _batchnorm_types(work) == {"_BatchNormXd"}  # plain BatchNorms (Lightning's revert of sync_batchnorm)
    assert all(p.dtype == torch.float32 for p in work.parameters())
    # the same values (weights, biases, running statistics, counters), the copy in float32
    state = work.state_dict()
    assert state.keys() == before.keys()
    for key, value in before.items():
        assert state[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0)
    # the original is untouched and shares nothing with the copy
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    with torch.no_grad():
        for p in work.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_working_copy_keeps_float32_and_float64_models_in_their_dtype():
    assert all(p.dtype == torch.float32 for p in working_copy(tiny_classifier()).parameters())
    assert all(p.dtype == torch.float64 for p in working_copy(tiny_classifier().double()).parameters())


def _state_inside(context: Any) -> tuple[bool, torch.dtype]:
    with context():
        return torch.is_autocast_enabled("cpu"), torch.get_default_dtype()


def test_forward_context_rule():
    fp32, bf16 = tiny_classifier(), tiny_classifier().to(torch.bfloat16)
    mixed = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"), lightning_module=fp32)
    true = SimpleNamespace(precision_plugin=HalfPrecision("bf16-true"), lightning_module=bf16)
    plain = SimpleNamespace(precision_plugin=Precision(), lightning_module=fp32)
    assert _state_inside(forward_context(None, fp32)) == (False, torch.float32)
    assert _state_inside(forward_context(plain, fp32)) == (False, torch.float32)
    # bf16-mixed: the Trainer's autocast around the (float32) copy's forwards
    assert _state_inside(forward_context(mixed, working_copy(fp32))) == (True, torch.float32)
    # bf16-true: the float32 copy runs without the Trainer's context (which sets the default dtype to bfloat16) ...
    assert _state_inside(forward_context(true, working_copy(bf16))) == (False, torch.float32)
    # ... the bf16 model itself under it
    assert _state_inside(forward_context(true, bf16)) == (False, torch.bfloat16)


@pytest.fixture
def two_ranks(monkeypatch):
    """A simulated 2-rank process group in which any train-mode SyncBatchNorm forward fails (under real DDP it is a
    collective that rank 0, running an offline phase alone, would wait on forever)."""
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    forward = nn.SyncBatchNorm.forward

    def guarded(self: nn.SyncBatchNorm, input: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise AssertionError("a train-mode SyncBatchNorm forward (a collective) ran on one rank alone")
        return forward(self, input)

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", guarded)


@pytest.mark.parametrize("family", ["tsbd", "rnp"])
def test_offline_phases_of_a_sync_batchnorm_model_run_on_plain_batchnorms(family, two_ranks):
    """Stage 1 and RNP complete on a SyncBatchNorm model in a (simulated) 2-rank group, with the same result as on
    the plain model, and the user's model keeps its SyncBatchNorms."""

    def run(model: nn.Module) -> torch.Tensor:
        torch.manual_seed(0)
        if family == "tsbd":
            stage1 = NeuronWeightChangeReinit(neuron_ratio=0.3, lr_unlearn=1e-2, max_unlearn_epochs=2)
            stage1.apply(model, _clean_loader())
            return stage1.nwc
        rnp = ReconstructiveNeuronPruning(threshold=0.5, unlearn_epochs=1, mask_epochs=1)
        rnp.apply(model, _clean_loader())
        assert rnp.masks is not None
        return torch.cat(list(rnp.masks.values()))

    torch.manual_seed(0)
    plain = _trained_statistics(tiny_classifier())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert _batchnorm_types(synced) == {"SyncBatchNorm"}
    result = run(synced)
    assert _batchnorm_types(synced) == {"SyncBatchNorm"}  # the user's model keeps them
    torch.testing.assert_close(result, run(plain))  # weights and running statistics carried over to the copy
    torch.testing.assert_close(synced.state_dict(), plain.state_dict())  # the same zeroing / pruning
