"""Conformance: every registered callback under the settings real fine-tuning runs use (issue 10).

Each test runs over the whole registry (``tests/helpers/registry.py``), so a callback added there later is checked
automatically: checkpoints written mid-fit load strictly into a fresh module and hold no model-sized copies; a fit
resumed from a mid-epoch checkpoint equals the uninterrupted one; bf16 precisions, gradient accumulation, dataloader
reloads and ``limit_train_batches`` work; an instance reused for a second fit behaves like a fresh one; models as
users have them (dict / HF ``ModelOutput`` returns, a user loss, timm ResNet and ViT, a peft LoRA causal LM);
``sync_batchnorm`` conversion keeps hooks and gates; sharded strategies are refused at setup with a clear error; the
callback's metric reaches ``trainer.callback_metrics``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from tests.helpers.registry import REGISTRY, Entry
from tests.helpers.resume import MidEpochResumable, quiet_trainer

NAMES = sorted(REGISTRY)


KIND_CASES = [(name, kind) for name in NAMES for kind in (*REGISTRY[name].kinds, *REGISTRY[name].kind_errors)]


def _params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def _state(callback: Callback) -> str:
    return json.dumps(callback.state_dict(), default=repr, sort_keys=True)


def _fit(
    entry: Entry,
    callbacks: list[Callback],
    data: Any = None,
    module: Any = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
):
    pl.seed_everything(0, verbose=False)
    module = entry.make_module() if module is None else module
    trainer = quiet_trainer(callbacks=callbacks, **{"max_epochs": 2, **entry.trainer_kwargs, **kwargs})
    trainer.fit(module, entry.make_data() if data is None else data, ckpt_path=ckpt_path)
    return trainer, module


def _tensor_numel(obj: Any) -> int:
    """Floating-point values held in ``obj`` (RNG states, byte tensors, are not weights)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() if obj.is_floating_point() else 0
    if isinstance(obj, dict):
        return sum(_tensor_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_numel(v) for v in obj)
    return 0


# --- 1. checkpoints --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_mid_fit_checkpoints_load_strictly_into_a_fresh_module(name, tmp_path):
    """Every checkpoint of the fit (mid-epoch and epoch-end) loads strictly with ``load_from_checkpoint`` and
    ``load_state_dict(strict=True)``, and the callback's state in it is small (no model-sized copies)."""
    entry = REGISTRY[name]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    _, module = _fit(entry, [entry.make(), checkpoint], enable_checkpointing=True)
    paths = sorted(tmp_path.glob("*.ckpt"))
    assert len(paths) >= 2, [p.name for p in paths]
    model_numel = sum(p.numel() for p in module.parameters())
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        fresh = entry.make_module()
        fresh.load_state_dict(ckpt["state_dict"], strict=True)
        type(fresh).load_from_checkpoint(path, map_location="cpu", strict=True)
        states = [v for k, v in ckpt["callbacks"].items() if k.startswith(name)]
        assert states, f"{name}'s state is not in {path.name}: {list(ckpt['callbacks'])}"
        held = _tensor_numel(states)
        assert held < 0.5 * model_numel, f"{name} keeps {held} tensor values in its state (model: {model_numel})"


# --- 2. resume -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_fit(name, tmp_path):
    entry = REGISTRY[name]

    def data() -> pl.LightningDataModule:
        return entry.make_data() if entry.native_mid_epoch else MidEpochResumable(entry.make_data())

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")

    full = entry.make()
    _, full_module = _fit(entry, [full, checkpoint()], data=data(), max_epochs=3, enable_checkpointing=True)
    resumed = entry.make()
    pl.seed_everything(0, verbose=False)
    resumed_module = entry.make_module()
    trainer = quiet_trainer(
        callbacks=[resumed, checkpoint()], max_epochs=3, enable_checkpointing=True, **entry.trainer_kwargs
    )
    trainer.fit(resumed_module, data(), ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert torch.equal(_params(full_module), _params(resumed_module))
    assert _state(full) == _state(resumed)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].resume_overrides])
def test_state_is_found_when_non_essential_arguments_change_on_resume(name, tmp_path):
    entry = REGISTRY[name]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit(entry, [entry.make(), checkpoint], max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    changed = entry.cls(**{**entry.kwargs, **entry.resume_overrides})
    assert changed.state_key in saved, f"{changed.state_key} not among {list(saved)}"
    _fit(entry, [changed], max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"), default_root_dir=tmp_path)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].essential_change])
def test_resume_with_a_changed_essential_argument_raises(name, tmp_path):
    # the state is still found (stable state_key), and refused with an error naming the argument instead of being
    # silently ignored (a one-off phase run again on fine-tuned weights, gates restarted on folded weights)
    entry = REGISTRY[name]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit(entry, [entry.make(), checkpoint], max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    changed = entry.cls(**{**entry.kwargs, **entry.essential_change})
    with pytest.raises(ValueError, match="|".join(entry.essential_change)):
        _fit(entry, [changed], max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"), default_root_dir=tmp_path)


# --- 3. precision and loops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_precisions(name, precision):
    entry = REGISTRY[name]
    if precision in entry.setting_errors:
        with pytest.raises((ValueError, TypeError), match=entry.setting_errors[precision]):
            _fit(entry, [entry.make()], max_epochs=1, precision=precision)
        return
    callback = entry.make()
    trainer, module = _fit(entry, [callback], max_epochs=1, precision=precision)
    assert trainer.global_step > 0
    assert torch.isfinite(_params(module)).all()
    assert entry.worked is None or entry.worked(callback, trainer), f"{name} did nothing under {precision}"


LOOPS = {
    "accumulate_grad_batches": {"accumulate_grad_batches": 2},
    "limit_train_batches": {"limit_train_batches": 3},
}


@pytest.mark.parametrize("setting", sorted(LOOPS))
@pytest.mark.parametrize("name", NAMES)
def test_loop_settings(name, setting):
    entry = REGISTRY[name]
    if setting in entry.setting_errors:
        with pytest.raises((ValueError, TypeError), match=entry.setting_errors[setting]):
            _fit(entry, [entry.make()], **LOOPS[setting])
        return
    trainer, module = _fit(entry, [entry.make()], **LOOPS[setting])
    assert trainer.global_step > 0
    assert torch.isfinite(_params(module)).all()


@pytest.mark.parametrize("name", NAMES)
def test_reloading_dataloaders_every_epoch_changes_nothing(name):
    """``reload_dataloaders_every_n_epochs=1`` on data in a fixed order trains exactly as without reloads."""
    entry = REGISTRY[name]
    plain = entry.make()
    _, plain_module = _fit(entry, [plain], max_epochs=3)
    reloaded = entry.make()
    _, reloaded_module = _fit(entry, [reloaded], max_epochs=3, reload_dataloaders_every_n_epochs=1)
    assert torch.equal(_params(plain_module), _params(reloaded_module))
    assert _state(plain) == _state(reloaded)


@pytest.mark.parametrize("name", NAMES)
def test_an_instance_reused_for_a_second_fit_behaves_like_a_fresh_one(name):
    entry = REGISTRY[name]
    reused = entry.make()
    _fit(entry, [reused])
    _, second = _fit(entry, [reused])
    fresh = entry.make()
    _, reference = _fit(entry, [fresh])
    assert torch.equal(_params(second), _params(reference))
    assert _state(reused) == _state(fresh)


# --- 4. models as users have them ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), KIND_CASES, ids=[f"{n}-{k}" for n, k in KIND_CASES])
def test_model_kinds(name, kind):
    entry = REGISTRY[name]
    pl.seed_everything(0, verbose=False)
    module = entry.module_of_kind(kind)
    if kind in entry.kind_errors:
        with pytest.raises((ValueError, TypeError), match=entry.kind_errors[kind]):
            _fit(entry, [entry.make(kind)], module=module, max_epochs=1)
        return
    before = _params(module).clone()
    callback = entry.make(kind)
    trainer, module = _fit(entry, [callback], module=module, max_epochs=1)
    assert trainer.global_step > 0
    after = _params(module)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert entry.worked is None or entry.worked(callback, trainer), f"{name} did nothing on a {kind} model"


# --- 5. strategies ---------------------------------------------------------------------------------------------------


class ConvertSyncBatchNorm(Callback):
    """Converts the module's BatchNorms to ``SyncBatchNorm`` after the other callbacks' ``setup``, as Lightning's DDP
    strategy does for ``sync_batchnorm=True`` (without a process group, SyncBatchNorm computes as BatchNorm)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        nn.SyncBatchNorm.convert_sync_batchnorm(pl_module)


def _has_batchnorm(entry: Entry) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in entry.make_module().modules())


@pytest.mark.parametrize("name", [n for n in NAMES if _has_batchnorm(REGISTRY[n])])
def test_sync_batchnorm_conversion_keeps_hooks_and_selections(name):
    entry = REGISTRY[name]
    plain = entry.make()
    _, plain_module = _fit(entry, [plain])
    converted = entry.make()
    _, converted_module = _fit(entry, [converted, ConvertSyncBatchNorm()])
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted_module.modules())
    assert torch.equal(_params(plain_module), _params(converted_module))
    assert _state(plain) == _state(converted)


def _sharded_strategies() -> list[Any]:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    # uninitialised instances: only their type matters to the check, and building real ones needs GPUs or deepspeed
    return [object.__new__(FSDPStrategy), object.__new__(DeepSpeedStrategy)]


@pytest.mark.parametrize("strategy", _sharded_strategies(), ids=["fsdp", "deepspeed"])
@pytest.mark.parametrize("name", NAMES)
def test_sharded_strategies_are_refused_at_setup(name, strategy):
    entry = REGISTRY[name]
    trainer = quiet_trainer()
    trainer._accelerator_connector.strategy = strategy
    with pytest.raises((ValueError, RuntimeError), match=type(strategy).__name__.replace("Strategy", "")):
        entry.make().setup(trainer, entry.make_module(), "fit")


# --- 6. observability ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].metric])
def test_the_callbacks_metric_can_be_monitored(name, tmp_path: Path):
    entry = REGISTRY[name]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=entry.metric, mode="max", save_top_k=1)
    trainer, _ = _fit(entry, [entry.make(), checkpoint], enable_checkpointing=True)
    assert entry.metric in trainer.callback_metrics
    assert checkpoint.best_model_path, f"ModelCheckpoint could not monitor {entry.metric}"


@pytest.mark.parametrize("name", NAMES)
def test_no_progress_bar_when_the_trainer_has_none(name, capfd):
    """Offline phases (unlearning, statistics passes, probes, mask recovery) draw no bar with
    ``enable_progress_bar=False``."""
    entry = REGISTRY[name]
    _fit(entry, [entry.make()], max_epochs=1)
    err = capfd.readouterr().err
    assert "%|" not in err, f"{name} drew a progress bar: {err[-500:]}"
