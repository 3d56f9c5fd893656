"""Reconstructive Neuron Pruning (backdoor.md section 8, item 7): mask hook, mask recovery, pruning, the callback;
its move from ``lightning_ft.pruning`` to ``lightning_ft.backdoor`` (issue 11): the old paths warn, old checkpoints
resume."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ft.backdoor.rnp as rnp
from lightning_ft.backdoor import ReconstructiveNeuronPruning, rnp_prune_, rnp_recover_masks, rnp_unlearn
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier, SmallBNCNN
from tests.helpers.models import tiny_classifier
from tests.helpers.resume import quiet_trainer

BNS = ["model.features.1", "model.features.4", "model.features.8"]
QUICK = {"unlearn_epochs": 2, "mask_epochs": 2}


def clean_loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    x, y = load_digits_tensors(8)
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size)


def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallBNCNN(width=4)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for x, _ in clean_loader():
            model(x)
    return model


@pytest.mark.parametrize("train", [True, False])
def test_mask_hook_of_ones_reproduces_the_output_and_matches_bn_with_masked_gamma(train):
    model = trained_cnn()
    model.train(train)
    x = next(iter(clean_loader()))[0]
    with torch.no_grad():
        expected = model(x)
    bn = model.features[4]
    handle = bn.register_forward_hook(rnp._mask_hook(torch.ones(8)))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    handle.remove()

    # a fractional mask: BN(x; gamma * m, beta), as the official MaskBatchNorm2d
    m = torch.linspace(0, 1, 8)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.features[4].weight.mul_(m)
        handle = bn.register_forward_hook(rnp._mask_hook(m))
        torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-5)
    handle.remove()


class RecordingSGD(torch.optim.SGD):
    """Records the mask parameters' range before each step (the previous step's clamp applied) and right after
    each raw step (before the clamp)."""

    seen: ClassVar[list[tuple[float, float]]] = []
    raw: ClassVar[list[tuple[float, float]]] = []

    def _range(self) -> tuple[float, float]:
        flat = torch.cat([p.detach().flatten() for g in self.param_groups for p in g["params"]])
        return flat.min().item(), flat.max().item()

    def zero_grad(self, set_to_none: bool = True) -> None:
        RecordingSGD.seen.append(self._range())
        super().zero_grad(set_to_none)

    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        RecordingSGD.raw.append(self._range())
        return out


def test_recovered_masks_stay_in_unit_interval_and_leave_the_model_untouched(monkeypatch):
    model = trained_cnn()
    before = copy.deepcopy(model.state_dict())
    RecordingSGD.seen, RecordingSGD.raw = [], []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    # a large learning rate: the raw steps leave [0, 1], the clamp brings them back
    masks = rnp_recover_masks(model, clean_loader(), lr=50.0, epochs=3, alpha=1.0)
    assert len(RecordingSGD.seen) == len(RecordingSGD.raw) == 3 * 4
    assert RecordingSGD.seen[0] == (1.0, 1.0)  # initialised to 1
    assert all(0.0 <= lo <= hi <= 1.0 for lo, hi in RecordingSGD.seen)
    assert any(lo < 0.0 or hi > 1.0 for lo, hi in RecordingSGD.raw)
    assert list(masks) == ["features.1", "features.4", "features.8"]
    flat = torch.cat(list(masks.values()))
    assert flat.min() >= 0 and flat.max() <= 1 and (flat < 1).any()
    assert all(not m.requires_grad for m in masks.values())

    after = model.state_dict()  # parameters unchanged (only the running statistics moved), hooks removed
    for key, value in before.items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(after[key], value), key
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_unlearning_stops_at_the_accuracy_threshold_or_the_cap():
    model = trained_cnn()
    epochs, acc = rnp_unlearn(model, clean_loader(), lr=0.05, max_epochs=3, stop_acc=1.0)
    assert (epochs, 0.0 <= acc <= 1.0) == (1, True)  # stop_acc 1: the first epoch stops
    epochs, _ = rnp_unlearn(trained_cnn(), clean_loader(), lr=0.05, max_epochs=2, stop_acc=0.0)
    assert epochs == 2  # the cap
    with pytest.raises(ValueError, match="empty"):
        rnp_unlearn(trained_cnn(), [], max_epochs=1)


def test_prune_zeroes_gamma_only_for_masks_at_or_below_the_threshold():
    model = trained_cnn()
    with torch.no_grad():
        for bn in (model.features[1], model.features[4]):
            bn.bias.uniform_(0.5, 1.0)  # nonzero beta everywhere
    before = copy.deepcopy(model.state_dict())
    masks = {
        "features.1": torch.tensor([0.2, 0.19, 0.21, 1.0]),
        "features.4": torch.tensor([0.0, 0.5, 0.2, 0.9, 0.2000001, 0.1, 1.0, 0.3]),
    }
    pruned = rnp_prune_(model, masks, threshold=0.2)
    assert {k: v.tolist() for k, v in pruned.items()} == {"features.1": [0, 1], "features.4": [0, 2, 5]}
    after = model.state_dict()
    for name, idx in pruned.items():
        gamma, beta = after[f"{name}.weight"], after[f"{name}.bias"]
        assert torch.all(gamma[idx] == 0)
        keep = torch.ones_like(gamma, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(gamma[keep], before[f"{name}.weight"][keep])
        assert torch.equal(beta, before[f"{name}.bias"])  # beta kept: the channel becomes the constant beta
    for key in after:  # nothing else changed
        if not key.startswith(("features.1.weight", "features.4.weight")):
            assert torch.equal(after[key], before[key]), key
    with pytest.raises(ValueError, match="not a module"):
        rnp_prune_(model, {"features.99": torch.zeros(2)}, 0.2)


class GammaChecker(pl.Callback):
    """After the RNP callback: records the pruned gamma after every training batch."""

    def __init__(self, rnp_callback: ReconstructiveNeuronPruning) -> None:
        self.rnp = rnp_callback
        self.pruned_gamma: list[float] = []
        self.weights_at_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights_at_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        modules = dict(pl_module.named_modules())
        values = [
            modules[name].weight.detach()[idx].abs().max() for name, idx in self.rnp.pruned.items() if idx.numel()
        ]
        self.pruned_gamma.append(torch.stack(values).max().item())


@pytest.mark.parametrize("keep_pruned", [True, False])
def test_callback_prunes_before_training_and_keep_pruned_holds_gamma_at_zero(keep_pruned):
    # threshold 0.99: most channels' masks fall below it after a short recovery on the unlearned copy
    callback = ReconstructiveNeuronPruning(threshold=0.99, keep_pruned=keep_pruned, **QUICK)
    checker = GammaChecker(callback)
    module = tiny_classifier()
    with torch.no_grad():  # beta > 0: a pruned channel outputs beta, passes the ReLU, and its gamma gets gradients
        for name in BNS:
            dict(module.named_modules())[name].bias.uniform_(0.1, 0.5)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback, checker])
    trainer.fit(module, clean_loader())
    assert callback.done and trainer.global_step == 4
    assert callback.report["channels"] == 28 and 0 < callback.report["pruned_channels"] < 28
    assert sum(int(v.numel()) for v in callback.pruned.values()) == callback.report["pruned_channels"]
    assert set(callback.masks) == set(BNS)
    for name, idx in callback.pruned.items():  # what was pruned is what the masks say
        assert torch.equal(idx, (callback.masks[name] <= 0.99).nonzero().flatten())
    start = checker.weights_at_start
    for name in BNS:  # at the start of training: only gamma of the pruned channels changed
        idx = callback.pruned[name]
        assert torch.all(start[f"{name}.weight"][idx] == 0)
        assert torch.equal(start[f"{name}.bias"], before[f"{name}.bias"])
    if keep_pruned:
        assert checker.pruned_gamma == [0.0] * 4
    else:  # the negative control: the optimizer moves them again
        assert checker.pruned_gamma[-1] > 0


def test_finetune_false_stops_without_a_training_step():
    callback = ReconstructiveNeuronPruning(threshold=0.99, finetune=False, **QUICK)
    module = tiny_classifier()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, clean_loader())
    assert callback.done and trainer.global_step == 0
    after = module.state_dict()
    pruned = {f"{name}.weight": idx for name, idx in callback.pruned.items()}
    for key, value in before.items():
        if key in pruned:
            keep = torch.ones_like(value, dtype=torch.bool)
            keep[pruned[key]] = False
            assert torch.equal(after[key][keep], value[keep]) and torch.all(after[key][~keep] == 0)
        else:
            assert torch.equal(after[key], value), key  # no step: nothing else moved


def test_without_batchnorm_is_a_clear_error():
    mlp_module = ImageClassifier(arch="mlp", width=4)
    with pytest.raises(ValueError, match="BatchNorm"):
        quiet_trainer(max_epochs=1, callbacks=[ReconstructiveNeuronPruning(**QUICK)]).fit(mlp_module, clean_loader())
    with pytest.raises(ValueError, match="BN-free"):
        rnp_recover_masks(mlp_module, clean_loader(), epochs=1)
    with pytest.raises(ValueError, match="BatchNorm"):
        ReconstructiveNeuronPruning(**QUICK).apply(mlp_module, clean_loader())


def test_apply_without_a_trainer():
    model = trained_cnn()
    before = copy.deepcopy(model)
    callback = ReconstructiveNeuronPruning(threshold=0.99, **QUICK)
    report = callback.apply(model, clean_loader())
    keys = {"unlearn_epochs", "unlearn_acc", "channels", "pruned_channels", "threshold"}
    assert report == callback.report and set(report) == keys and report["threshold"] == 0.99
    assert report["channels"] == 28 and 0 < report["pruned_channels"] < 28
    assert callback.seconds is not None and callback.seconds > 0
    assert set(callback.pruned) == {"features.1", "features.4", "features.8"}
    for name, idx in callback.pruned.items():
        bn, ref = dict(model.named_modules())[name], dict(before.named_modules())[name]
        assert torch.all(bn.weight[idx] == 0) and torch.equal(bn.bias, ref.bias)
    # the unlearning and recovery ran on a copy: every other parameter is untouched
    for (key, value), ref in zip(model.state_dict().items(), before.state_dict().values(), strict=True):
        if not key.endswith("weight") or key.split(".weight")[0] not in callback.pruned:
            assert torch.equal(value, ref), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"unlearn_stop_acc": 2.0}, "unlearn_stop_acc"),
        ({"unlearn_lr": 0.0}, "unlearn_lr"),
        ({"mask_lr": -1.0}, "mask_lr"),
        ({"alpha": 0.0}, "alpha"),
        ({"unlearn_clip_norm": 0.0}, "unlearn_clip_norm"),
        ({"unlearn_epochs": 0}, "unlearn_epochs"),
        ({"mask_epochs": 1.5}, "mask_epochs"),
    ],
)
def test_invalid_init_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconstructiveNeuronPruning(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the move from lightning_ft.pruning (issue 11): the old import paths work for one release, with a FutureWarning


@pytest.mark.parametrize("name", ["ReconstructiveNeuronPruning", "rnp_prune_", "rnp_recover_masks", "rnp_unlearn"])
def test_the_old_package_names_warn_and_resolve_to_the_backdoor_ones(name):
    import lightning_ft.backdoor
    import lightning_ft.pruning

    assert name not in lightning_ft.pruning.__all__ and name in lightning_ft.backdoor.__all__
    with pytest.warns(FutureWarning, match=rf"lightning_ft\.backdoor import {name}`"):
        old = getattr(lightning_ft.pruning, name)
    assert old is getattr(lightning_ft.backdoor, name)
    with pytest.warns(FutureWarning, match="lightning_ft.backdoor"):
        exec(f"from lightning_ft.pruning import {name}", {})  # the statement users have in their code
    with pytest.raises(AttributeError, match="no attribute 'rnp_no_such_name'"):
        lightning_ft.pruning.rnp_no_such_name  # noqa: B018


def test_the_old_module_warns_on_import_and_reexports(monkeypatch):
    import importlib
    import sys

    import lightning_ft.pruning

    monkeypatch.delitem(sys.modules, "lightning_ft.pruning.rnp", raising=False)  # imported afresh: it warns
    monkeypatch.delattr(lightning_ft.pruning, "rnp", raising=False)
    with pytest.warns(FutureWarning, match=r"`lightning_ft\.pruning\.rnp` moved to `lightning_ft\.backdoor\.rnp`"):
        old = importlib.import_module("lightning_ft.pruning.rnp")
    assert old.__all__ == ["ReconstructiveNeuronPruning", "rnp_prune_", "rnp_recover_masks", "rnp_unlearn"]
    for name in old.__all__:
        assert getattr(old, name) is getattr(rnp, name)
    assert old._mask_hook is rnp._mask_hook  # code that reached into the module's private names


def test_a_checkpoint_of_the_callback_before_the_move_resumes(tmp_path, monkeypatch):
    """The state key is the class name, without the module path: a checkpoint written while the class lived in
    ``lightning_ft.pruning.rnp`` (same key, same state) is found by the moved class, and RNP does not run again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.warns(FutureWarning):
        from lightning_ft.pruning import ReconstructiveNeuronPruning as OldPath
    assert OldPath is ReconstructiveNeuronPruning
    assert ReconstructiveNeuronPruning(**QUICK).state_key == "ReconstructiveNeuronPruning"  # the pre-move key

    first = OldPath(threshold=0.99, **QUICK)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        tiny_classifier(), clean_loader()
    )
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert "ReconstructiveNeuronPruning" in saved["callbacks"]
    data = path.read_bytes()  # no module path of the class anywhere in the file (nothing pickled by class)
    assert b"pruning.rnp" not in data and b"backdoor.rnp" not in data

    def run_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("RNP ran again on resume: the checkpointed state was not found")

    monkeypatch.setattr(ReconstructiveNeuronPruning, "_run", run_again)
    resumed = ReconstructiveNeuronPruning(threshold=0.99, **QUICK)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[resumed])
    trainer.fit(tiny_classifier(), clean_loader(), ckpt_path=str(path))
    assert resumed.done and trainer.global_step == 8 and resumed.report == first.report
    assert resumed.pruned.keys() == first.pruned.keys()
    assert all(torch.equal(resumed.pruned[k], first.pruned[k]) for k in first.pruned)


# --- threshold="auto" ------------------------------------------------------------------------------------------------

AUTO = {**QUICK, "calibration_epochs": 1, "calibration_folds": 2}


def test_auto_threshold_is_the_default_and_prunes_at_the_chosen_threshold():
    assert ReconstructiveNeuronPruning().threshold == "auto"
    model = trained_cnn()
    callback = ReconstructiveNeuronPruning(**AUTO)
    report = callback.apply(model, clean_loader())
    rows = report["calibration"]
    assert rows and [r["threshold"] for r in rows] == sorted(r["threshold"] for r in rows)
    chosen = report["threshold"]
    if report["calibration_rule"] == "largest_within_budget":
        assert chosen == [r["threshold"] for r in rows if r["within_budget"]][-1]
    assert callback.masks is not None
    flat = torch.cat(list(callback.masks.values()))
    assert report["pruned_channels"] == int((flat <= chosen).sum())
    assert sum(int(idx.numel()) for idx in callback.pruned.values()) == report["pruned_channels"]
    for row in rows:  # each row's size is the number of channels its threshold prunes
        assert row["channels"] == int((flat <= row["threshold"]).sum())


@pytest.mark.parametrize(("finetune", "epochs"), [(True, 1), (False, 0)])
def test_auto_probes_fine_tune_only_when_the_fit_does(monkeypatch, finetune, epochs):
    import lightning_ft.backdoor.calibration as calibration

    seen = []
    original = calibration.repaired_counts

    def spy(model, edit, folds, n_epochs, optimizer, context):
        seen.append((n_epochs, edit.hold is not None))
        return original(model, edit, folds, n_epochs, optimizer, context)

    monkeypatch.setattr(calibration, "repaired_counts", spy)
    ReconstructiveNeuronPruning(**AUTO, finetune=finetune).apply(trained_cnn(), clean_loader())
    assert seen and all(e == epochs for e, _ in seen)
    assert all(hold for _, hold in seen)  # keep_pruned: the probes hold the pruned gamma at zero too


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": "best"}, "threshold"),
        ({"calibration_candidates": []}, "calibration_candidates"),
        ({"calibration_candidates": [0.1, 1.5]}, "calibration_candidates"),
        ({"max_acc_drop": 2.0}, "max_acc_drop"),
        ({"calibration_folds": 1}, "calibration_folds"),
    ],
)
def test_auto_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconstructiveNeuronPruning(**kwargs)


def test_resume_refuses_another_threshold_rule():
    state = {"done": True, "pruned": {}, "report": {}, "arguments": ReconstructiveNeuronPruning()._pruning_arguments()}
    ReconstructiveNeuronPruning().load_state_dict(state)
    with pytest.raises(ValueError, match="threshold"):
        ReconstructiveNeuronPruning(threshold=0.2).load_state_dict(state)
    with pytest.raises(ValueError, match="max_acc_drop"):
        ReconstructiveNeuronPruning(max_acc_drop=0.2).load_state_dict(state)
