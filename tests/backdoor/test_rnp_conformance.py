"""Conformance of RNP (issue 10; moved from ``tests/pruning`` with the callback, issue 11): ``sync_batchnorm``-converted
BatchNorms, HF ``ModelOutput`` returns, bf16 precisions, the user's loss, progress bar and ``verbose``, reuse for a
second fit. The checks shared with the pruning callbacks (sharded strategies refused) stay in
``tests/pruning/test_conformance.py``; the registry's generic conformance suite runs on RNP too."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_ft.backdoor.rnp as rnp
from lightning_ft.backdoor import ReconstructiveNeuronPruning
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.data import small_digits_datamodule
from tests.helpers.kinds import OutputClassifier
from tests.helpers.models import tiny_classifier
from tests.helpers.resume import quiet_trainer
from tests.helpers.strategies import SyncBatchNormStrategy

BNS = ["model.features.1", "model.features.4", "model.features.8"]
QUICK_RNP = {"threshold": 0.99, "unlearn_epochs": 2, "mask_epochs": 2, "unlearn_stop_acc": 0.0}


class UserLossClassifier(ImageClassifier):
    """Defines the documented loss hook: label-smoothed cross-entropy, counted."""

    calls = 0

    def lightning_ft_loss(self, batch: Any) -> torch.Tensor:
        type(self).calls += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1], label_smoothing=0.1)


def test_rnp_under_sync_batchnorm_runs_on_plain_batchnorms_and_holds_the_pruned_gamma(monkeypatch):
    seen: list[set[str]] = []
    unlearn = rnp.rnp_unlearn

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
        return unlearn(model, *args, **kwargs)

    monkeypatch.setattr(rnp, "rnp_unlearn", spy)
    callback = ReconstructiveNeuronPruning(threshold=0.99, unlearn_epochs=2, mask_epochs=2)
    gamma: list[float] = []
    types: set[str] = set()

    class Checker(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            modules = dict(pl_module.named_modules())
            types.update(type(modules[name]).__name__ for name in BNS)
            gamma.append(max(modules[n].weight.detach()[i].abs().max().item() for n, i in callback.pruned.items()))

    module = tiny_classifier()
    with torch.no_grad():  # beta > 0: pruned channels get gradients, keep_pruned must hold them at 0
        for name in BNS:
            dict(module.named_modules())[name].bias.uniform_(0.1, 0.5)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, callbacks=[callback, Checker()], strategy=SyncBatchNormStrategy()
    )
    trainer.fit(module, small_digits_datamodule())
    assert types == {"SyncBatchNorm"}
    # RNP runs on rank 0 only: its copy must not hold SyncBatchNorms (their collectives would wait for other ranks)
    assert seen and "SyncBatchNorm" not in set.union(*seen)
    assert 0 < callback.report["pruned_channels"] < 28 and gamma == [0.0] * 4


@pytest.mark.parametrize("kind", ["model_output", "bf16-true", "bf16-mixed", "user_loss"])
def test_rnp_with_model_outputs_precisions_and_the_user_loss(kind, monkeypatch):
    autocast: list[bool] = []
    model_loss = rnp.model_loss

    def spy(model: nn.Module, batch: Any) -> Any:
        autocast.append(torch.is_autocast_enabled("cpu"))
        return model_loss(model, batch)

    monkeypatch.setattr(rnp, "model_loss", spy)
    cls = {"model_output": OutputClassifier, "user_loss": UserLossClassifier}.get(kind, ImageClassifier)
    UserLossClassifier.calls = 0
    module = cls(width=4, lr=0.05)
    precision = kind if kind.startswith("bf16") else "32-true"
    callback = ReconstructiveNeuronPruning(**QUICK_RNP)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback], precision=precision)
    trainer.fit(module, small_digits_datamodule())
    assert callback.done and callback.report["unlearn_epochs"] == 2 and 0 < callback.report["pruned_channels"] < 28
    assert float(trainer.callback_metrics["rnp/pruned_channels"]) == callback.report["pruned_channels"]
    assert len(autocast) == 2 * 4 * 2  # 2 phases x 2 epochs x 4 batches
    assert all(autocast) if kind == "bf16-mixed" else not any(autocast)
    if kind == "bf16-true":
        assert next(module.parameters()).dtype == torch.bfloat16  # the model stays bf16; RNP ran on a float32 copy
    if kind == "user_loss":
        assert UserLossClassifier.calls >= 2 * 4 * 2  # the offline phases used the user's loss


def test_rnp_progress_bar_follows_the_trainer_and_verbose_logs_each_epoch(capsys, monkeypatch):
    def fit(progress: bool, **kwargs: Any) -> str:
        callback = ReconstructiveNeuronPruning(**QUICK_RNP, **kwargs)
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback], enable_progress_bar=progress)
        capsys.readouterr()
        trainer.fit(tiny_classifier(), small_digits_datamodule())
        return capsys.readouterr().err

    assert "RNP unlearning" not in fit(False) and "RNP mask recovery" not in fit(False)
    shown = fit(True)
    assert "RNP unlearning" in shown and "RNP mask recovery" in shown
    assert "RNP unlearning" not in fit(True, progress_bar=False)
    lines: list[str] = []  # Lightning's logger may not propagate to caplog (it depends on the root logger at import)
    monkeypatch.setattr("lightning_ft._internal.offline.rank_zero_info", lines.append)
    fit(False, verbose=True)
    unlearning = [m for m in lines if m.startswith("RNP unlearning: epoch")]
    assert [m.split(" acc=")[0] for m in unlearning] == ["RNP unlearning: epoch 1/2", "RNP unlearning: epoch 2/2"]
    assert sum(m.startswith("RNP mask recovery: epoch") and "loss=" in m for m in lines) == 2


def test_a_reused_rnp_callback_runs_again_on_its_second_fit():
    callback = ReconstructiveNeuronPruning(**QUICK_RNP)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(
        tiny_classifier(), small_digits_datamodule()
    )
    first = dict(callback.pruned)
    module = tiny_classifier(seed=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback.finetune = False  # RNP, then stop: no training step when RNP runs (it used to be skipped as done)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, small_digits_datamodule())
    assert callback.done and trainer.global_step == 0
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # only gamma of the pruned channels
    for name, idx in callback.pruned.items():
        assert torch.all(dict(module.named_modules())[name].weight[idx] == 0)
    assert first.keys() == callback.pruned.keys()
