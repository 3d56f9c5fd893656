"""Conformance of the memorisation callbacks (issue 10): best weights in a checkpoint file, stable state key and
resume without re-measuring the baseline, metrics in callback_metrics, reuse for a second fit, precision and loops."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor

from lightning_ft.demos.models import CausalLMModule
from lightning_ft.memorisation import MemorisationEarlyStopping, MemorisationMonitor, find_causal_lm
from tests.helpers.data import pydoc_datamodule
from tests.helpers.models import tiny_lm_module
from tests.helpers.resume import quiet_trainer

PROBE: dict[str, Any] = {
    "probe_size": 8,
    "prefix_len": 16,
    "suffix_len": 16,
    "ngram_sizes": (2, 3),
    "batch_size": 4,
    "log_examples": 0,
}
KEYS = ("ngram", "exact", "token_acc")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


class ScriptedMetric(pl.Callback):
    """Logs ``fake_val`` (values by epoch) and records the weights at every epoch end (before the stopper's check)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.weights: dict[int, dict[str, Tensor]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("fake_val", self.values[trainer.current_epoch], on_epoch=True)
        self.weights[trainer.global_step] = _params(pl_module)


# ------------------------------------------------------------------------------------------------- 1. best weights
def test_restore_best_writes_the_best_weights_to_a_checkpoint_file_not_to_the_state(tmp_path):
    scripted = ScriptedMetric([3.0, 1.0, 2.0])  # the best validation value is epoch 1 (step 8)
    stopper = MemorisationEarlyStopping(**PROBE, max_rise=0.9, restore_best=True, val_monitor="fake_val", verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = quiet_trainer(
        max_epochs=3,
        callbacks=[scripted, stopper, checkpoint],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    module = tiny_lm_module()
    trainer.fit(module, pydoc_datamodule())

    assert stopper.best is not None and stopper.best["step"] == 8
    path = Path(stopper.best_model_path)
    assert path == tmp_path / "memorisation_best" / "best-epoch=1-step=8.ckpt"  # default dirpath: default_root_dir
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the previous best file was replaced
    saved = torch.load(path, weights_only=False)["state_dict"]
    for key, value in scripted.weights[8].items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)  # restored at train end
    # a normal Lightning checkpoint: it loads strictly into a freshly built module
    fresh = CausalLMModule.load_from_checkpoint(path)
    for key, value in scripted.weights[8].items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    # no model-sized copy in the callback state, neither in memory nor in the checkpoint written by ModelCheckpoint
    state = stopper.state_dict()
    assert _tensors_in(state) == [] and state["best_model_path"] == str(path)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert _tensors_in(last["callbacks"]["MemorisationEarlyStopping"]) == []


def test_restore_best_uses_the_dirpath_argument_and_a_logger_directory(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    stopper = MemorisationEarlyStopping(**PROBE, max_rise=0.9, restore_best=True, verbose=False)
    logger = CSVLogger(tmp_path / "logs")
    trainer = quiet_trainer(max_epochs=1, callbacks=[stopper], logger=logger, limit_val_batches=0)
    trainer.fit(tiny_lm_module(), pydoc_datamodule())
    assert Path(stopper.best_model_path).parent == Path(logger.log_dir) / "memorisation_best"

    stopper = MemorisationEarlyStopping(
        **PROBE, max_rise=0.9, restore_best=True, verbose=False, dirpath=str(tmp_path / "mine")
    )
    quiet_trainer(max_epochs=1, callbacks=[stopper], limit_val_batches=0).fit(tiny_lm_module(), pydoc_datamodule())
    assert stopper.best_model_path == str(tmp_path / "mine" / "best-epoch=0-step=4.ckpt")
    with pytest.raises(ValueError, match="dirpath"):
        MemorisationEarlyStopping(dirpath="")


def test_resume_restores_the_best_file_and_tracks_afresh_when_it_is_gone(tmp_path):
    def stopper() -> MemorisationEarlyStopping:
        return MemorisationEarlyStopping(
            **PROBE, max_rise=0.9, restore_best=True, verbose=False, dirpath=str(tmp_path / "best")
        )

    first = stopper()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True)
    trainer.fit(
        tiny_lm_module(),
        pydoc_datamodule(),
    )
    assert first.best_model_path.endswith("best-epoch=0-step=4.ckpt")

    resumed = stopper()
    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed], limit_val_batches=0)
    trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.best["step"] == 8 and resumed.best_model_path.endswith("best-epoch=1-step=8.ckpt")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["best-epoch=1-step=8.ckpt"]

    (tmp_path / "best" / "best-epoch=1-step=8.ckpt").rename(tmp_path / "elsewhere.ckpt")
    Path(first.best_model_path).parent.mkdir(exist_ok=True)
    # e.g. resuming from an earlier checkpoint of a run whose later best replaced the file: warned, tracked afresh
    again = stopper()
    trainer = quiet_trainer(max_epochs=2, callbacks=[again], limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"best-epoch=0-step=4\.ckpt' are gone"):  # the file the checkpoint names
        trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert again.best["step"] == 8 and Path(again.best_model_path).exists()


# ------------------------------------------------------------------------------------- 2. state key and baseline
def _first_fit(tmp_path: Path, callback: pl.Callback, max_epochs: int = 1) -> Path:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=[callback, checkpoint], enable_checkpointing=True, limit_val_batches=0
    )
    trainer.fit(tiny_lm_module(), pydoc_datamodule())
    return tmp_path / "ckpt" / "last.ckpt"


def test_state_key_does_not_depend_on_cadence_or_logging_arguments():
    a = MemorisationMonitor(**PROBE, check_every_n_epochs=1)
    b = MemorisationMonitor(**{**PROBE, "log_examples": 3}, check_every_n_epochs=None, check_every_n_steps=2)
    assert a.state_key == b.state_key == "MemorisationMonitor"
    c = MemorisationEarlyStopping(**PROBE, max_rise=0.1, patience=1)
    d = MemorisationEarlyStopping(**PROBE, max_rise=0.3, patience=4, check_every_n_steps=2, verbose=False)
    assert c.state_key == d.state_key == "MemorisationEarlyStopping"
    with pytest.raises(RuntimeError, match="more than one stateful callback"):  # they would log the same keys
        quiet_trainer(callbacks=[a, b])


@pytest.mark.parametrize("cls", [MemorisationMonitor, MemorisationEarlyStopping])
def test_resume_with_another_cadence_keeps_the_history_and_never_remeasures_step_zero(cls, tmp_path):
    extra = {"max_rise": 0.9, "verbose": False} if cls is MemorisationEarlyStopping else {}
    first = cls(**PROBE, **extra, check_every_n_epochs=1)
    ckpt = _first_fit(tmp_path, first)
    assert [h["step"] for h in first.history] == [0, 4]

    resumed = cls(**PROBE, **extra, check_every_n_epochs=None, check_every_n_steps=2, progress_bar=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed], limit_val_batches=0)
    trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(ckpt))
    assert resumed.baseline == first.baseline
    assert resumed.history[:2] == first.history
    assert [h["step"] for h in resumed.history] == [0, 4, 6, 8]  # one step-0 entry: from the checkpoint


def test_resume_from_a_checkpoint_without_baseline_does_not_measure_it_on_fine_tuned_weights(tmp_path):
    ckpt = _first_fit(tmp_path, MemorisationMonitor(**PROBE, check_at_start=False))
    monitor = MemorisationMonitor(**PROBE)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], limit_val_batches=0)
    with pytest.warns(UserWarning, match="no step-0 baseline"):
        trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(ckpt))
    assert monitor.baseline is None and [h["step"] for h in monitor.history] == [4, 8]
    # a checkpoint written without the callback at all: same (the early stopping's max_rise rule cannot work)
    stopper = MemorisationEarlyStopping(**PROBE, max_rise=0.1)
    trainer = quiet_trainer(max_epochs=2, callbacks=[stopper], limit_val_batches=0)
    with pytest.raises(ValueError, match="no step-0 baseline"):
        trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(ckpt))


def test_resume_with_other_probe_arguments_raises(tmp_path):
    ckpt = _first_fit(tmp_path, MemorisationMonitor(**PROBE))
    monitor = MemorisationMonitor(**{**PROBE, "suffix_len": 8})
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], limit_val_batches=0)
    with pytest.raises(ValueError, match="suffix_len=16 -> 8"):
        trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(ckpt))


def test_state_under_the_old_argument_key_is_still_found(tmp_path):
    first = MemorisationMonitor(**PROBE)
    ckpt = _first_fit(tmp_path, first)
    checkpoint = torch.load(ckpt, weights_only=False)
    state = checkpoint["callbacks"].pop("MemorisationMonitor")
    old_key = "MemorisationMonitor{'probe_size': 8, 'prefix_len': 16, 'check_every_n_epochs': 1}"
    checkpoint["callbacks"][old_key] = state
    torch.save(checkpoint, tmp_path / "old.ckpt")
    monitor = MemorisationMonitor(**PROBE)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(tiny_lm_module(), pydoc_datamodule(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert monitor.history[:2] == first.history and [h["step"] for h in monitor.history] == [0, 4, 8]


# ------------------------------------------------------------------------------------------------- 3. logging
def test_mem_metrics_reach_callback_metrics_and_model_checkpoint_monitors_them(tmp_path):
    monitor = MemorisationMonitor(**PROBE)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="mem/ngram", mode="min", save_top_k=1)
    early = EarlyStopping(monitor="mem/token_acc", mode="min", patience=100, check_on_train_epoch_end=True)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[monitor, checkpoint, early], enable_checkpointing=True, limit_val_batches=0
    )
    trainer.fit(tiny_lm_module(), pydoc_datamodule())
    assert checkpoint.best_model_path and checkpoint.best_model_score is not None
    assert early.best_score is not None and not math.isinf(float(early.best_score))
    metrics = trainer.callback_metrics
    assert {f"mem/{k}" for k in KEYS} | {f"mem/{k}_baseline" for k in KEYS} <= set(metrics)
    assert float(metrics["mem/token_acc"]) == pytest.approx(monitor.history[-1]["token_acc"])
    assert float(metrics["mem/token_acc_baseline"]) == pytest.approx(monitor.baseline["token_acc"])


# ------------------------------------------------------------------------------------------- 5. a second fit
@pytest.mark.parametrize("cls", [MemorisationMonitor, MemorisationEarlyStopping])
def test_an_instance_reused_for_a_second_fit_behaves_like_a_fresh_one(cls, tmp_path):
    extra = {"max_rise": 0.01, "restore_best": True, "dirpath": str(tmp_path), "verbose": False}
    kwargs = {**PROBE, **(extra if cls is MemorisationEarlyStopping else {})}
    reused = cls(**kwargs)
    pl.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[reused], limit_val_batches=0).fit(tiny_lm_module(), pydoc_datamodule())
    first_indices = reused.state_dict()["probe_indices"]

    def second_fit(callback: pl.Callback) -> dict[str, Any]:
        pl.seed_everything(0, verbose=False)
        data = pydoc_datamodule(n_train=24, seq_len=40)  # another data set: another probe
        quiet_trainer(max_epochs=2, callbacks=[callback], limit_val_batches=0).fit(tiny_lm_module(seed=1), data)
        return callback.state_dict()

    again, fresh = second_fit(reused), second_fit(cls(**kwargs))
    assert again == fresh
    assert again["probe_indices"] != first_indices and again["history"][0]["step"] == 0


# ---------------------------------------------------------------------------------------- 6. precision and loops
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("cls", [MemorisationMonitor, MemorisationEarlyStopping])
def test_precision_accumulation_and_dataloader_reloading(cls, precision, tmp_path):
    if cls is MemorisationEarlyStopping:
        callback = cls(**PROBE, max_rise=0.9, restore_best=True, verbose=False, check_every_n_steps=1)
    else:
        callback = cls(**PROBE, check_every_n_steps=1, tf_every_n_steps=1)
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=[callback],
        precision=precision,
        accumulate_grad_batches=2,
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=3,
        default_root_dir=tmp_path,
    )
    module = tiny_lm_module()
    trainer.fit(module, pydoc_datamodule())
    # 3 batches with accumulation 2 = 2 optimizer steps per epoch; one check per step (the epoch-end check of the
    # same step is not repeated), the probe drawn once although the loader is rebuilt every epoch
    assert [h["step"] for h in callback.history] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(h[k]) for h in callback.history for k in KEYS)
    assert "mem/ngram" in trainer.callback_metrics
    if cls is MemorisationMonitor:
        assert [h["step"] for h in callback.tf_history] == [1, 2, 3, 4]
    else:
        saved = torch.load(callback.best_model_path, weights_only=False)["state_dict"]
        for key, value in module.state_dict().items():
            assert value.dtype == saved[key].dtype
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- 7. peft LoRA
def test_monitor_finds_and_probes_a_peft_lora_model():
    peft = pytest.importorskip("peft")
    module = tiny_lm_module()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    module.model = peft.get_peft_model(module.model, config)
    assert find_causal_lm(module) is module.model
    monitor = MemorisationMonitor(**PROBE)
    quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0).fit(module, pydoc_datamodule())
    assert [h["step"] for h in monitor.history] == [0, 4]


@pytest.mark.parametrize("enable_progress_bar", [False, True])
def test_probe_progress_bar_follows_the_trainer(enable_progress_bar, capfd, tmp_path):
    monitor = MemorisationMonitor(**PROBE)
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[monitor], enable_progress_bar=enable_progress_bar, default_root_dir=tmp_path
    )
    trainer.fit(tiny_lm_module(), pydoc_datamodule())
    assert ("memorisation probe" in capfd.readouterr().err) is enable_progress_bar
