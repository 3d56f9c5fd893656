"""``LearnedMaskPruning`` in a Trainer: the gate optimizer, the schedule, the final sparsity, logging, resume,
gradient accumulation and errors."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.pruning import LearnedMaskPruning, attach_gates, find_gates, gate_penalty_grad, num_pruned
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier
from tests.helpers.resume import assert_same_weights, fit_and_resume, quiet_trainer

# tiny_classifier: width 4, BatchNorms of 4, 8 and 16 channels; small digits: 4 optimizer steps per epoch
BN_SIZES = {"model.features.1": 4, "model.features.4": 8, "model.features.8": 16}


class Probe(pl.Callback):
    """Placed after the pruning callback: records the masks each step sees and the module optimizer's params."""

    def __init__(self, pruning: LearnedMaskPruning) -> None:
        self.pruning = pruning
        self.steps: list[int] = []
        self.masks: list[list[torch.Tensor | None]] = []
        self.optimizer_param_ids: list[int] = []
        self.score_ids: list[int] = []
        self.initial_scores: list[torch.Tensor] = []
        self.gate_steps = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer_param_ids = [id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        self.score_ids = [id(g.gate.scores) for g in self.pruning.gated]
        self.initial_scores = [g.gate.scores.detach().clone() for g in self.pruning.gated]
        optimizer = self.pruning._optimizer
        step = optimizer.step

        def counting_step(*args: Any, **kwargs: Any) -> Any:
            self.gate_steps += 1
            return step(*args, **kwargs)

        optimizer.step = counting_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.steps.append(trainer.global_step)
        self.masks.append([None if g.gate.mask is None else g.gate.mask.clone() for g in self.pruning.gated])


def fit(callback: LearnedMaskPruning, module: pl.LightningModule | None = None, **trainer_kwargs: Any):
    module = module or tiny_classifier()
    probe = Probe(callback)
    kwargs = {"max_epochs": 2, "limit_val_batches": 0, **trainer_kwargs}
    trainer = quiet_trainer(callbacks=[callback, probe], **kwargs)
    trainer.fit(module, small_digits_datamodule())
    return module, probe, trainer


def zero_channels(module: pl.LightningModule) -> dict[str, int]:
    modules = dict(module.named_modules())
    return {name: int(((modules[name].weight == 0) & (modules[name].bias == 0)).sum()) for name in BN_SIZES}


def test_scores_are_trained_by_the_callback_not_the_module_optimizer_and_gates_can_stay():
    n_params = len(list(tiny_classifier().parameters()))
    callback = LearnedMaskPruning(sparsity=0.5, make_permanent=False)
    module, probe, trainer = fit(callback)
    assert [g.name for g in callback.gated] == list(BN_SIZES)
    assert len(probe.optimizer_param_ids) == n_params  # configure_optimizers saw the scores; they were taken out
    assert not set(probe.score_ids) & set(probe.optimizer_param_ids)
    gate_params = callback._optimizer.param_groups[0]["params"]
    assert [id(p) for p in gate_params] == probe.score_ids
    assert callback._optimizer.param_groups[0]["lr"] == 1e-2  # the sigmoid default
    for g, before in zip(callback.gated, probe.initial_scores, strict=True):
        assert not torch.equal(g.gate.scores.detach(), before)  # trained
        assert g.gate.scores.grad is None  # and their gradients cleared after each step
    assert probe.gate_steps == trainer.global_step == 8

    # make_permanent=False: the gates stay, with the final masks, and nothing is folded into the weights
    gated = find_gates(module)
    assert [g.gate for g in gated] == [g.gate for g in callback.gated]
    assert [int((~g.gate.mask).sum()) for g in gated] == [2, 4, 8]
    assert any(k.endswith("neuron_gate.scores") for k in module.state_dict())
    assert zero_channels(module) == dict.fromkeys(BN_SIZES, 0)
    assert callback.pruned == {}


def test_masks_follow_the_schedule_freeze_and_are_logged(tmp_path):
    callback = LearnedMaskPruning(sparsity=0.5, schedule_start=0.25, schedule_end=0.75, make_permanent=False)
    logger = CSVLogger(tmp_path, name="csv")
    _, probe, trainer = fit(callback, logger=logger, log_every_n_steps=1)
    total = 8
    assert callback._total == total and probe.steps == list(range(total))
    sizes = list(BN_SIZES.values())
    for step, masks in zip(probe.steps, probe.masks, strict=True):
        target = callback.target_sparsity(step)
        assert target == pytest.approx(
            0.0 if step <= 2 else 0.5 if step >= 6 else 0.5 * (1 - (1 - (step - 2) / 4) ** 3)
        )
        if target == 0:
            assert masks == [None] * 3
            continue
        pruned = [int((~m).sum()) for m in masks]
        assert pruned == [min(math.floor(target * n + 1e-9), n - 1) for n in sizes]
    frozen = probe.masks[6]
    assert all(all(torch.equal(a, b) for a, b in zip(m, frozen, strict=True)) for m in probe.masks[6:])
    assert callback._frozen is not None and callback.current_sparsity == 14 / 28

    metrics = trainer.callback_metrics
    assert metrics["prune/sparsity"] == pytest.approx(0.5) and metrics["prune/target_sparsity"] == pytest.approx(0.5)
    assert 0 < float(metrics["prune/gate_density"]) < 1
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [(int(r["step"]), float(r["prune/sparsity"]), float(r["prune/target_sparsity"])) for r in rows]
    assert len(logged) == total
    for step, sparsity, target in logged:
        assert target == pytest.approx(callback.target_sparsity(step))
        assert sparsity == pytest.approx(num_pruned(sizes, target) / 28)


@pytest.mark.parametrize(
    ("gate_type", "scope"), [("sigmoid", "layer"), ("hard_concrete", "layer"), ("sigmoid", "global")]
)
def test_final_model_has_the_target_sparsity_and_the_plain_state_dict_keys(gate_type, scope):
    plain_keys = list(tiny_classifier().state_dict())
    callback = LearnedMaskPruning(sparsity=0.5, gate_type=gate_type, scope=scope)
    module, _, _ = fit(callback)
    assert find_gates(module) == [] and callback.gated == []
    assert list(module.state_dict()) == plain_keys
    zeros = zero_channels(module)
    if scope == "layer":
        assert zeros == {name: n // 2 for name, n in BN_SIZES.items()}
    else:
        assert sum(zeros.values()) == 14 and all(v < BN_SIZES[k] for k, v in zeros.items())
    assert callback.pruned == zeros if gate_type == "sigmoid" else sum(callback.pruned.values()) >= 14
    fresh = tiny_classifier()
    fresh.load_state_dict(module.state_dict(), strict=True)


class RecordingPruning(LearnedMaskPruning):
    """Keeps the state it was restored from."""

    loaded: dict[str, Any] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = dict(state_dict)
        super().load_state_dict(state_dict)


@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_stop_and_resume_mid_schedule_equals_uninterrupted(gate_type, tmp_path):
    def callbacks() -> list[pl.Callback]:
        # 8 steps, the sparsity rises over steps 0-6: the stop after epoch 1 (step 4) is mid-schedule
        kwargs = {"total_steps": 8, "schedule_start": 0.0, "schedule_end": 0.75, "make_permanent": False}
        return [RecordingPruning(sparsity=0.5, gate_type=gate_type, **kwargs)]

    (full, (full_cb,)), (resumed, (resumed_cb,)) = fit_and_resume(
        tiny_classifier, small_digits_datamodule, callbacks, max_epochs=2, stop_epoch=1, tmp_path=tmp_path
    )
    # the resumed callback was restored mid-schedule: no frozen masks yet, the target still rising
    loaded = resumed_cb.loaded
    assert loaded is not None
    assert loaded["frozen"] is None and loaded["total"] == 8
    assert 0 < loaded["current_sparsity"] < 0.5 and loaded["optimizer"]["state"]

    assert_same_weights(full, resumed)
    for ga, gb in zip(find_gates(full), find_gates(resumed), strict=True):
        assert torch.equal(ga.gate.mask, gb.gate.mask)

    sa, sb = full_cb.state_dict(), resumed_cb.state_dict()
    assert sa["total"] == sb["total"] == 8 and sa["current_sparsity"] == sb["current_sparsity"] == 0.5
    assert all(torch.equal(x, y) for x, y in zip(sa["frozen"], sb["frozen"], strict=True))
    assert torch.equal(sa["generator"], sb["generator"])
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for i, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][i][name]), (i, name)


def test_gradient_accumulation_steps_the_scores_once_per_optimizer_step():
    callback = LearnedMaskPruning(sparsity=0.5, make_permanent=False, schedule_start=0.0, schedule_end=1.0)
    _, probe, trainer = fit(callback, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and callback._total == 4  # 8 batches, 2 per optimizer step
    assert probe.gate_steps == 4
    adam_steps = {float(s["step"]) for s in callback._optimizer.state_dict()["state"].values()}
    assert adam_steps == {4.0}
    assert probe.steps == [0, 0, 1, 1, 2, 2, 3, 3]
    for i in range(0, 8, 2):  # masks change between optimizer steps only
        first, second = probe.masks[i], probe.masks[i + 1]
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(first, second, strict=True))


class AdagradClassifier(ImageClassifier):
    def configure_optimizers(self) -> Any:
        return torch.optim.Adagrad(self.parameters(), lr=0.05)  # creates its state for every param in __init__


def test_optimizer_with_eager_state_still_checkpoints(tmp_path):
    callback = LearnedMaskPruning(sparsity=0.5, total_steps=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    module = AdagradClassifier(width=4)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, callbacks=[callback, checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, small_digits_datamodule())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert len(saved["optimizer_states"][0]["state"]) == len(list(AdagradClassifier(width=4).parameters()))


class ManualClassifier(ImageClassifier):
    def __init__(self) -> None:
        super().__init__(width=4)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class Stream(IterableDataset):
    def __iter__(self):
        x, y = load_digits_tensors(8)
        yield from zip(x[:64], y[:64], strict=True)


def test_errors_at_fit():
    with pytest.raises(ValueError, match="manual optimization"):
        quiet_trainer(max_epochs=1, callbacks=[LearnedMaskPruning()]).fit(ManualClassifier(), small_digits_datamodule())
    with pytest.raises(ValueError, match="total_steps"):  # an iterable dataset without max_steps
        quiet_trainer(max_epochs=1, callbacks=[LearnedMaskPruning()]).fit(
            tiny_classifier(), DataLoader(Stream(), batch_size=16)
        )
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[LearnedMaskPruning(total_steps=2)])
    trainer.fit(tiny_classifier(), DataLoader(Stream(), batch_size=16))  # ... which total_steps fixes
    assert trainer.global_step == 2

    module = tiny_classifier()
    attach_gates(module, gate_type="hard_concrete")
    with pytest.raises(ValueError, match="already has a 'hard_concrete' gate"):
        quiet_trainer(max_epochs=1, callbacks=[LearnedMaskPruning()]).fit(module, small_digits_datamodule())
    with pytest.raises(ValueError, match="no eligible layer"):
        quiet_trainer(max_epochs=1, callbacks=[LearnedMaskPruning()]).fit(
            ImageClassifier(arch="mlp", width=4), small_digits_datamodule()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": True}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"gate_type": "l0"}, "gate_type"),
        ({"layer_types": ()}, "layer_types"),
        ({"layer_types": ("attention",)}, "layer_types"),
        ({"scope": "net"}, "scope"),
        ({"schedule_start": 0.8, "schedule_end": 0.2}, "schedule_start"),
        ({"schedule_end": 1.5}, "schedule_start"),
        ({"penalty": -1.0}, "penalty"),
        ({"penalty": float("nan")}, "penalty"),
        ({"gate_lr": 0.0}, "gate_lr"),
        ({"min_keep": -1}, "min_keep"),
        ({"total_steps": 0}, "total_steps"),
    ],
)
def test_invalid_init_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedMaskPruning(**kwargs)


def test_fp16_grad_scaler_unscales_the_scores_and_skips_non_finite_steps():
    """The gate step under a (stand-in) fp16 GradScaler: Lightning unscales only the module's optimizer."""
    callback = LearnedMaskPruning(sparsity=0.5, penalty=2.0, total_steps=10, schedule_start=0.0, schedule_end=0.5)
    module = tiny_classifier()
    callback.gated = attach_gates(module)
    callback._total = 10
    scores = [g.gate.scores for g in callback.gated]
    callback._optimizer = torch.optim.SGD(scores, lr=1.0)  # plain SGD: the step shows the gradient's scale
    scale = 1024.0
    trainer = SimpleNamespace(
        global_step=5, precision_plugin=SimpleNamespace(scaler=SimpleNamespace(get_scale=lambda: scale))
    )
    grads = [torch.randn(s.shape, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(scores)]
    before = [s.detach().clone() for s in scores]
    penalty = gate_penalty_grad([g.gate for g in callback.gated])
    for s, g in zip(scores, grads, strict=True):
        s.grad = g * scale
    callback.on_before_optimizer_step(trainer, module, None)
    weight = 2.0 * callback.target_sparsity(5) / 0.5  # penalty * s_t / sparsity
    assert weight == pytest.approx(2.0)
    for s, b, g, p in zip(scores, before, grads, penalty, strict=True):
        torch.testing.assert_close(s.detach(), b - (g + weight * p))
        assert s.grad is None

    before = [s.detach().clone() for s in scores]
    scores[0].grad = torch.full_like(scores[0], float("inf"))  # an overflowed step: the scaler skips it
    callback.on_before_optimizer_step(trainer, module, None)
    assert all(torch.equal(s.detach(), b) for s, b in zip(scores, before, strict=True))
    assert all(s.grad is None for s in scores)
