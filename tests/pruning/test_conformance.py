"""Conformance of the pruning callbacks (issue 10): checkpoints that load into a fresh module, exact resume from
them, a reused callback, ``sync_batchnorm``-converted BatchNorms, measured sparsity in ``callback_metrics``,
sharded strategies refused, the classifier head never gated, HF ``ModelOutput`` returns and ``bf16-true``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from lightning_ft._internal.neurons import classifier_heads
from lightning_ft.backdoor import ReconstructiveNeuronPruning
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.pruning import LearnedMaskPruning, attach_gates, find_gates
from lightning_ft.pruning.gates import GATE_ATTR
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier, tiny_lm
from tests.helpers.resume import assert_same_weights, quiet_trainer
from tests.helpers.strategies import SyncBatchNormStrategy

BNS = ["model.features.1", "model.features.4", "model.features.8"]


def pruning(**overrides: Any) -> LearnedMaskPruning:
    # small digits: 4 optimizer steps per epoch; the sparsity rises over steps 0-4 of 8 and is frozen from step 4
    kwargs = {"sparsity": 0.5, "total_steps": 8, "schedule_start": 0.0, "schedule_end": 0.5, "make_permanent": False}
    return LearnedMaskPruning(**{**kwargs, **overrides})


def eval_logits(module: nn.Module) -> torch.Tensor:
    x = next(iter(_batches()))[0]
    module.eval()
    with torch.no_grad():
        return module(x)


def _batches():
    data = small_digits_datamodule()
    data.setup("fit")
    return data.train_dataloader()


# ---------------------------------------------------------------------------------------------------------------
# 1. checkpoints written mid-fit hold the folded model and resume exactly


@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_mid_fit_checkpoint_loads_strictly_into_a_fresh_module_and_predicts_like_the_gated_model(gate_type, tmp_path):
    callback = pruning(gate_type=gate_type)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    module = tiny_classifier()
    # the fit stops at the checkpoint's step (make_permanent=False): the module is the gated model of that step
    trainer = quiet_trainer(
        max_steps=5, limit_val_batches=0, callbacks=[callback, checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, small_digits_datamodule())
    path = tmp_path / "step=5.ckpt"
    saved = torch.load(path, weights_only=False)
    assert not [k for k in saved["state_dict"] if GATE_ATTR in k]
    assert list(saved["state_dict"]) == list(tiny_classifier().state_dict())

    fresh = ImageClassifier.load_from_checkpoint(path)  # strict
    plain = tiny_classifier()
    plain.load_state_dict(saved["state_dict"], strict=True)
    gated = find_gates(module)
    assert all(g.gate.mask is not None and (~g.gate.mask).any() for g in gated)  # masks were in use
    modules = dict(fresh.named_modules())
    for g in gated:  # the masks are folded in: zeroed output channels
        pruned = ~g.gate.mask
        assert torch.all(modules[g.name].weight[pruned] == 0) and torch.all(modules[g.name].bias[pruned] == 0)
        assert torch.all(g.module.weight[pruned] != 0)  # ... in the checkpoint only: the live module is unfolded
    expected = eval_logits(module)
    torch.testing.assert_close(eval_logits(fresh), expected, rtol=1e-5, atol=1e-6)
    if gate_type == "sigmoid":  # binary gates fold exactly
        assert torch.equal(eval_logits(fresh), expected)

    # the callback's state keeps what resuming needs: scores and the original values of the folded rows
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("LearnedMaskPruning"))
    assert set(state["scores"]) == set(BNS) and set(state["unfolded"]) == set(BNS)
    for g in gated:
        assert torch.equal(state["scores"][g.name], g.gate.scores.detach())
        index = state["unfolded"][g.name]["index"]
        assert torch.equal(index, (g.gate.eval_value() != 1).nonzero().flatten())
        assert torch.equal(state["unfolded"][g.name]["weight"], g.module.weight.detach()[index])


@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_resume_from_a_step_checkpoint_with_folded_weights_equals_the_uninterrupted_run(gate_type, tmp_path):
    # the checkpoint of step 4 (every_n_train_steps, after the last batch of epoch 1; the digits DataLoader is not
    # resumable mid-epoch) is mid-schedule: masks in use, the sparsity still rising, folded rows to restore
    pl.seed_everything(0, verbose=False)
    full, full_cb = tiny_classifier(), pruning(gate_type=gate_type)
    quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[full_cb]).fit(full, small_digits_datamodule())

    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    quiet_trainer(
        max_steps=4,
        limit_val_batches=0,
        callbacks=[pruning(gate_type=gate_type), checkpoint],
        enable_checkpointing=True,
    ).fit(tiny_classifier(), small_digits_datamodule())
    saved = torch.load(tmp_path / "step=4.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("LearnedMaskPruning"))
    assert state["frozen"] is None and state["unfolded"] and not [k for k in saved["state_dict"] if GATE_ATTR in k]

    resumed, resumed_cb = tiny_classifier(), pruning(gate_type=gate_type)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[resumed_cb])
    trainer.fit(resumed, small_digits_datamodule(), ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert trainer.global_step == 8
    assert_same_weights(full, resumed)
    for ga, gb in zip(find_gates(full), find_gates(resumed), strict=True):
        assert torch.equal(ga.gate.mask, gb.gate.mask)


# ---------------------------------------------------------------------------------------------------------------
# 2. a callback reused for a second fit behaves like a fresh one


class MaskRecorder(pl.Callback):
    def __init__(self, callback: LearnedMaskPruning) -> None:
        self.callback = callback
        self.masks: list[list[torch.Tensor | None]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.masks.append([None if g.gate.mask is None else g.gate.mask.clone() for g in self.callback.gated])


@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_a_reused_callback_starts_its_second_fit_afresh(gate_type):
    def second_fit(callback: LearnedMaskPruning) -> tuple[nn.Module, MaskRecorder]:
        module, recorder = tiny_classifier(seed=1), MaskRecorder(callback)
        pl.seed_everything(0, verbose=False)
        quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[callback, recorder]).fit(
            module, small_digits_datamodule()
        )
        return module, recorder

    reused = pruning(gate_type=gate_type, make_permanent=True, schedule_start=0.25)
    quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[reused]).fit(
        tiny_classifier(), small_digits_datamodule()
    )
    assert reused._frozen is not None  # the first fit ended with frozen masks
    again, again_rec = second_fit(reused)
    fresh, fresh_rec = second_fit(pruning(gate_type=gate_type, make_permanent=True, schedule_start=0.25))
    assert again_rec.masks[0] == [None] * 3  # before the schedule starts: no mask (not the first fit's)
    for a, b in zip(again_rec.masks, fresh_rec.masks, strict=True):
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for (key, a), b in zip(again.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


# ---------------------------------------------------------------------------------------------------------------
# 3. sync_batchnorm: the BatchNorms are converted after the callbacks' setup


class GatedOutputs(pl.Callback):
    """After the pruning callback: records each gated BatchNorm's output channels that should be masked."""

    def __init__(self, callback: LearnedMaskPruning) -> None:
        self.callback = callback
        self.masked_max: list[float] = []
        self.types: set[str] = set()
        self._handles: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        modules = dict(pl_module.named_modules())
        for name in BNS:
            bn, gate = modules[name], getattr(modules[name], GATE_ATTR)
            self.types.add(type(bn).__name__)
            if gate.mask is None:
                continue

            def hook(module: nn.Module, inputs: Any, output: torch.Tensor, mask: torch.Tensor = gate.mask) -> None:
                self.masked_max.append(output.detach()[:, ~mask].abs().max().item())

            self._handles.append(bn.register_forward_hook(hook))  # after the gate's hook: sees the gated output

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def test_gates_survive_sync_batchnorm_conversion():
    callback = pruning()
    recorder = GatedOutputs(callback)
    module = tiny_classifier()
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, callbacks=[callback, recorder], strategy=SyncBatchNormStrategy()
    )
    trainer.fit(module, small_digits_datamodule())
    assert recorder.types == {"SyncBatchNorm"}  # training ran on the converted BatchNorms
    assert len(recorder.masked_max) >= 3 * 6 and max(recorder.masked_max) == 0.0  # masked channels output 0
    assert [g.name for g in callback.gated] == BNS
    assert all(isinstance(g.module, nn.SyncBatchNorm) for g in callback.gated)


# ---------------------------------------------------------------------------------------------------------------
# 5. prune/sparsity is measured on the gates; both metrics reach callback_metrics


@pytest.mark.parametrize(
    ("gate_type", "init"), [("sigmoid", None), ("hard_concrete", -3.0)], ids=["sigmoid", "closed-hard-concrete"]
)
def test_logged_sparsity_is_the_measured_share_of_pruned_neurons(gate_type, init):
    # HardConcrete at init -3: the eval gates start closed (0), so the model is sparser than the masks' target
    callback = pruning(gate_type=gate_type, init=init)
    module = tiny_classifier()
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, small_digits_datamodule())
    gates = [g.gate for g in find_gates(module)]
    masked = sum(int((~g.mask).sum()) for g in gates)
    closed = sum(int(g.pruned().sum()) for g in gates)  # masked, or a HardConcrete gate at 0
    metrics = trainer.callback_metrics
    assert float(metrics["prune/target_sparsity"]) == pytest.approx(0.5)
    assert float(metrics["prune/sparsity"]) == pytest.approx(closed / 28)
    if gate_type == "sigmoid":
        assert closed == masked == 14
    else:
        assert closed > masked == 14  # not the schedule's 0.5


# ---------------------------------------------------------------------------------------------------------------
# 6. sharded strategies are refused at setup


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy])
@pytest.mark.parametrize("callback_cls", [LearnedMaskPruning, ReconstructiveNeuronPruning])
def test_sharded_strategies_are_a_clear_error_at_setup(strategy_cls, callback_cls):
    trainer = SimpleNamespace(strategy=object.__new__(strategy_cls))  # no process group or deepspeed needed
    with pytest.raises(ValueError, match=f"{callback_cls.__name__} .*does not support {strategy_cls.__name__}"):
        callback_cls().setup(trainer, tiny_classifier(), "fit")


# ---------------------------------------------------------------------------------------------------------------
# 7. layer discovery never selects the classifier head by default


def test_the_classifier_head_is_never_gated_by_default():
    timm = pytest.importorskip("timm")
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    assert classifier_heads(resnet) == ["fc"]
    gated = [g.name for g in attach_gates(resnet, layer_types=("bn", "linear"))]
    assert gated and "fc" not in gated
    with pytest.raises(ValueError, match="classifier head"):  # the head is the only linear layer
        attach_gates(timm.create_model("test_resnet", pretrained=False, num_classes=10), layer_types=("linear",))
    named = attach_gates(timm.create_model("test_resnet", num_classes=10), layer_types=("linear",), include=("^fc$",))
    assert [g.name for g in named] == ["fc"]  # ... unless include names it

    module = ImageClassifier(arch="test_resnet", num_classes=10, in_channels=1)  # wrapped in a LightningModule
    assert classifier_heads(module) == ["model.fc"]
    lm = tiny_lm()
    assert classifier_heads(lm) == ["lm_head"]  # HF get_output_embeddings
    with pytest.raises(ValueError, match="classifier head"):
        attach_gates(lm, layer_types=("linear",))
    cnn = tiny_classifier()  # a plain model: its last conv/linear layer
    assert classifier_heads(cnn) == ["model.fc"]
    assert "model.fc" not in [g.name for g in attach_gates(cnn, layer_types=("conv", "linear"))]


# ---------------------------------------------------------------------------------------------------------------
# 4. models as users have them (HF ModelOutput), precisions (RNP's: tests/backdoor/test_rnp_conformance.py)


class ModelOutputClassifier(ImageClassifier):
    """Returns an HF ``ModelOutput`` (``training_step`` reads it with ``logits_of``)."""

    def forward(self, x: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.model(x))


@pytest.mark.parametrize("kind", ["model_output", "bf16-true"])
def test_learned_mask_pruning_with_model_outputs_and_bf16_true(kind, tmp_path):
    module = ModelOutputClassifier(width=4, lr=0.05) if kind == "model_output" else tiny_classifier()
    callback = pruning(make_permanent=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[callback, checkpoint],
        enable_checkpointing=True,
        precision="bf16-true" if kind == "bf16-true" else "32-true",
    )
    trainer.fit(module, small_digits_datamodule())
    assert sum(callback.pruned.values()) == 14 and not find_gates(module)
    saved = torch.load(tmp_path / "step=5.ckpt", weights_only=False)
    fresh = type(module)(width=4, lr=0.05)
    fresh.load_state_dict(saved["state_dict"], strict=True)
    if kind == "bf16-true":
        assert next(module.parameters()).dtype == torch.bfloat16
        assert saved["state_dict"]["model.features.1.weight"].dtype == torch.bfloat16


def test_a_changed_gate_lr_takes_effect_on_resume(tmp_path):
    """The gate optimizer's moments come from the checkpoint, its learning rate from the resumed callback."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[pruning(), checkpoint], enable_checkpointing=True)
    trainer.fit(tiny_classifier(), small_digits_datamodule())
    resumed = pruning(gate_lr=0.05, make_permanent=False)
    lrs: list[float] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            lrs.extend(group["lr"] for group in resumed._optimizer.param_groups)

    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed, Spy()])
    trainer.fit(tiny_classifier(), small_digits_datamodule(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert lrs and set(lrs) == {0.05}
