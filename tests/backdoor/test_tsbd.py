"""``tsbd()``: both TSBD stages together: argument routing, stop-and-resume, a timm ResNet, 2-process DDP."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_ft.backdoor.callbacks as stage1_module
from lightning_ft.backdoor import ActivenessAwareFineTuning, NeuronWeightChangeReinit, tsbd
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.data import small_digits_datamodule
from tests.helpers.ddp import run_ddp_script
from tests.helpers.models import tiny_classifier
from tests.helpers.resume import fit_and_resume, quiet_trainer

STAGE1 = {"neuron_ratio": 0.3, "lr_unlearn": 1e-2, "max_unlearn_epochs": 5, "progress_bar": False}


def test_tsbd_routes_every_argument_to_its_stage():
    loader = torch.utils.data.DataLoader(list(range(4)))
    stage1, stage2 = tsbd(
        dataloader=loader,
        neuron_ratio=0.4,
        subweight_ratio=0.6,
        lr_unlearn=3e-3,
        max_unlearn_epochs=7,
        unlearn_stop_acc=0.2,
        stop_on_single_class=False,
        layer_types=("conv", "linear"),
        include=("features",),
        exclude=("skip",),
        mode="clip",
        alpha=0.4,
        r=0.1,
        norm="global",
        eps=1e-9,
        clip_factor=1.5,
        progress_bar=False,
    )
    assert type(stage1) is NeuronWeightChangeReinit and type(stage2) is ActivenessAwareFineTuning
    assert (stage1.neuron_ratio, stage1.subweight_ratio, stage1.lr_unlearn) == (0.4, 0.6, 3e-3)
    assert (stage1.max_unlearn_epochs, stage1.unlearn_stop_acc, stage1.stop_on_single_class) == (7, 0.2, False)
    assert stage1.dataloader is loader and stage1.progress_bar is False
    assert (stage2.mode, stage2.alpha, stage2.r, stage2.norm) == ("clip", 0.4, 0.1, "global")
    assert (stage2.eps, stage2.clip_factor) == (1e-9, 1.5)
    for stage in (stage1, stage2):  # both stages work on the same neuron layers
        assert (stage.layer_types, stage.include, stage.exclude) == (("conv", "linear"), ("features",), ("skip",))

    default1, default2 = tsbd()
    assert (default1.layer_types, default1.exclude) == (default2.layer_types, default2.exclude)
    assert default2.mode == "penalty" and default1.dataloader is None


@pytest.mark.parametrize("mode", ["penalty", "clip"])
def test_stop_and_resume_equals_uninterrupted_and_runs_stage_one_once(mode, tmp_path, monkeypatch):
    events: list[str] = []
    unlearn = stage1_module.clean_unlearning

    def counting_unlearning(*args, **kwargs):
        events.append("unlearn")
        return unlearn(*args, **kwargs)

    monkeypatch.setattr(stage1_module, "clean_unlearning", counting_unlearning)

    def make_callbacks():
        events.append("fit")
        return tsbd(**STAGE1, mode=mode)

    (full, full_cbs), (resumed, resumed_cbs) = fit_and_resume(
        tiny_classifier, small_digits_datamodule, make_callbacks, max_epochs=3, stop_epoch=1, tmp_path=tmp_path
    )
    # uninterrupted fit, fit stopped after epoch 1, resumed fit: stage 1 unlearns in the first two only
    assert events == ["fit", "unlearn", "fit", "unlearn", "fit"]
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, value in full_state.items():  # parameters and BatchNorm buffers, bit for bit
        assert torch.equal(value, resumed_state[name]), name
    assert resumed_cbs[0].done and resumed_cbs[0].report == full_cbs[0].report
    assert full_cbs[0].report["zeroed_weights"] > 0
    assert resumed_cbs[1].steps == full_cbs[1].steps == 12  # 3 epochs x 4 batches, counted across the resume


class Stage1Snapshot(pl.Callback):
    """Placed after the TSBD callbacks: the weights right after stage 1."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("mode", ["penalty", "clip"])
def test_tsbd_runs_unmodified_on_a_timm_resnet(mode):
    pytest.importorskip("timm")
    module = ImageClassifier(arch="test_resnet", in_channels=1, lr=0.01)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    convs = {n: m for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    shortcuts = [n for n in convs if "downsample" in n]
    assert len(shortcuts) == 3  # timm names the projection shortcuts `downsample`

    stage1, stage2 = tsbd(**STAGE1, mode=mode)
    snapshot = Stage1Snapshot()
    trainer = quiet_trainer(max_epochs=1, callbacks=[stage1, stage2, snapshot], limit_val_batches=0)
    trainer.fit(module, small_digits_datamodule(image_size=16))

    report = stage1.report
    eligible = [n for n in convs if n not in shortcuts]
    assert report["neurons"] == sum(convs[n].out_channels for n in eligible)
    assert report["selected_neurons"] == int(report["neurons"] * 0.3) > 0
    assert report["zeroed_weights"] > 0
    after = snapshot.weights
    for name in shortcuts:  # stage 1 never touches a shortcut
        assert torch.equal(after[f"{name}.weight"], initial[f"{name}.weight"]), name
    new_zeros = sum(int((after[f"{n}.weight"] == 0).sum()) - int((initial[f"{n}.weight"] == 0).sum()) for n in eligible)
    assert new_zeros == report["zeroed_weights"]  # every zeroed weight is in an eligible conv
    assert torch.equal(after["model.fc.weight"], initial["model.fc.weight"])
    assert stage2.steps == trainer.global_step == 4  # 127 digits, batch 32: stage 2 ran at every step
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("mode", "skip_g2_reduce"),
    [("penalty", False), ("clip", False), ("penalty", True)],
    ids=["penalty", "clip", "penalty-no-g2-reduce"],
)
def test_ddp_ranks_agree_after_stage_one_and_after_every_stage_two_step(mode, skip_g2_reduce, tmp_path):
    args = ["--mode", mode, *(["--skip-g2-reduce"] if skip_g2_reduce else [])]
    r0, r1 = run_ddp_script("ddp_tsbd.py", tmp_path, *args)
    assert r0["world_size"] == r1["world_size"] == 2
    # shuffled data: the two ranks trained on different shards (so their local losses and gradients differ)
    assert r0["batch_fingerprints"] != r1["batch_fingerprints"]
    assert r0["report"] == r1["report"]
    assert r0["report"]["selected_neurons"] > 0 and r0["report"]["zeroed_weights"] > 0
    for r in (r0, r1):
        assert r["global_step"] == 4  # 127 digits over 2 ranks, batch 32, 2 epochs
        assert r["checks"] == 1 + r["global_step"] == 1 + len(r["step_diffs"])
        assert r["stage2_steps"] == r["global_step"]
        assert r["stage1_diff"] == 0.0
        assert r["zeros_after_stage1"] - r["zeros_before"] == r["report"]["zeroed_weights"]  # zeroed on every rank
        assert all(math.isfinite(p) for p in r["params"])
    if mode == "clip":
        assert r0["g2_spreads"] == r1["g2_spreads"] == []  # no perturbed pass
    else:
        # the perturbed-point gradient g2 differs across ranks before its mean: only the reduction aligns the ranks
        assert len(r0["g2_spreads"]) == r0["global_step"] and min(r0["g2_spreads"]) > 0
    if skip_g2_reduce:  # negative control: without the mean over ranks the replicas drift apart
        assert min(r0["step_diffs"]) > 0 and min(r1["step_diffs"]) > 0
    else:
        assert r0["step_diffs"] == r1["step_diffs"] == [0.0] * r0["global_step"]
        assert r0["params"] == r1["params"]


@pytest.mark.ddp
def test_ddp_auto_calibration_is_chosen_once_and_applied_on_every_rank(tmp_path):
    r0, r1 = run_ddp_script("ddp_tsbd.py", tmp_path, "--mode", "penalty", "--auto")
    assert r0["report"] == r1["report"]  # the same calibration rows and choice on both ranks (broadcast)
    assert r0["report"]["neuron_ratio"] in (0.1, 0.3) and len(r0["report"]["calibration"]) >= 1
    for r in (r0, r1):
        assert r["stage1_diff"] == 0.0
        assert r["zeros_after_stage1"] - r["zeros_before"] == r["report"]["zeroed_weights"] > 0
    assert r0["params"] == r1["params"]


@pytest.mark.ddp
@pytest.mark.parametrize("clean", ["loader", "batches"])
def test_ddp_an_error_in_stage_one_fails_every_rank(clean, tmp_path):
    r0, r1 = run_ddp_script("ddp_tsbd.py", tmp_path, "--mode", "penalty", "--bad-labels", clean)
    assert "labels" in r0["error"], r0
    if clean == "loader":  # data-parallel: every rank checks its own shard and fails
        assert "labels" in r1["error"], r1
    else:  # rank 0 alone: its error is broadcast and raised on the ranks waiting for the selection
        assert "raised on rank 0" in r1["error"] and r0["error"] in r1["error"], r1


@pytest.mark.ddp
def test_ddp_data_parallel_unlearning_selects_what_one_process_selects(tmp_path):
    # 2 ranks unlearn half-batches each with averaged gradients: the single-process unlearning up to float summation
    # order and the padding of the odd-sized set (127 digits), so the same selection, or nearly. An MLP: BatchNorm
    # layers normalise each rank's half-batch (as in any DDP fit without sync_batchnorm), which changes the path
    (two, _) = run_ddp_script("ddp_tsbd.py", tmp_path / "two", "--mode", "clip", "--model", "mlp")
    (one,) = run_ddp_script("ddp_tsbd.py", tmp_path / "one", "--mode", "clip", "--model", "mlp", devices=1)
    assert two["report"]["unlearn_epochs"] == one["report"]["unlearn_epochs"]
    assert two["report"]["selected_neurons"] == one["report"]["selected_neurons"]
    a, b = set(two["zero_positions"]), set(one["zero_positions"])
    assert len(a & b) / len(a | b) >= 0.9, (len(a), len(b), len(a & b))
