"""TSBD under real training settings (issue 10): bf16 precisions, HF/dict forward outputs, the user's loss, reuse of the
callbacks for a second fit, the progress bar, metrics in ``callback_metrics``, timm ResNet/ViT layer discovery (never
the classifier head), and refused sharded strategies."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

import lightning_ft.backdoor.callbacks as stage1_module
from lightning_ft._internal.forward import logits_of
from lightning_ft._internal.neurons import classifier_heads
from lightning_ft._internal.strategies import check_strategy
from lightning_ft.backdoor import ActivenessAwareFineTuning, NeuronWeightChangeReinit, tsbd
from lightning_ft.backdoor.layers import tsbd_layers
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier, tiny_mlp_classifier
from tests.helpers.resume import quiet_trainer

STAGE1: dict[str, Any] = {"neuron_ratio": 0.3, "lr_unlearn": 1e-2, "max_unlearn_epochs": 3, "progress_bar": False}


def fit(
    module: pl.LightningModule, callbacks: list[pl.Callback], data: dict[str, Any] | None = None, **trainer_kwargs: Any
) -> pl.Trainer:
    """One epoch on 127 digits (4 batches of 32), no validation."""
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, small_digits_datamodule(**(data or {})))
    return trainer


def clean_loader() -> torch.utils.data.DataLoader:
    """The same 127 digits as :func:`fit`, in order."""
    data = small_digits_datamodule()
    data.setup("fit")
    return torch.utils.data.DataLoader(data.train_dataset, batch_size=32)


@pytest.fixture
def unlearning_calls(monkeypatch):
    """Every call of clean_unlearning by stage 1: the copy's dtype and whether autocast was on in its forwards."""
    calls: list[dict[str, Any]] = []
    original = stage1_module.clean_unlearning

    def spy(model, *args, **kwargs):
        call: dict[str, Any] = {"dtype": next(model.parameters()).dtype, "autocast": set()}
        handle = model.register_forward_hook(
            lambda *_: call["autocast"].add(torch.is_autocast_enabled("cpu"))  # type: ignore[func-returns-value]
        )
        try:
            result = original(model, *args, **kwargs)
        finally:
            handle.remove()
        calls.append(call)
        return result

    monkeypatch.setattr(stage1_module, "clean_unlearning", spy)
    return calls


# ------------------------------------------------------------------------------------------------------------------
# 1. precisions
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["penalty", "clip"])
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_both_stages_run_under_bf16(precision, mode, unlearning_calls):
    module = tiny_classifier()
    stage1, stage2 = tsbd(**STAGE1, mode=mode)
    trainer = fit(module, [stage1, stage2], precision=precision)
    assert trainer.global_step == stage2.steps == 4
    assert stage1.report["selected_neurons"] == int(28 * 0.3) and stage1.report["zeroed_weights"] > 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    (call,) = unlearning_calls
    if precision == "bf16-true":
        assert next(module.parameters()).dtype == torch.bfloat16
        assert call["dtype"] == torch.float32  # unlearned on a float32 copy
        assert call["autocast"] == {False}
    else:
        assert call["dtype"] == torch.float32
        assert call["autocast"] == {True}  # the Trainer's autocast around the unlearning's forwards


def test_bf16_true_selection_compares_float32_with_float32():
    """The weight changes are those of the float32 copy relative to its own starting point (the bf16 weights)."""
    module = tiny_classifier().to(torch.bfloat16)
    stage1 = NeuronWeightChangeReinit(**STAGE1)
    layers = stage1.layers(module)
    reference = copy.deepcopy(module).float()
    loader = clean_loader()
    stage1_module.clean_unlearning(reference, loader, lr=1e-2, max_epochs=3)
    expected = {
        layer.name: layer.per_neuron((reference.get_submodule(layer.name).weight - layer.weight.float()).abs())
        for layer in layers
    }
    before = {layer.name: layer.weight.detach().clone() for layer in layers}
    stage1.apply(module, loader)
    nwc = torch.cat([e.sum(1) for e in expected.values()])
    torch.testing.assert_close(stage1.nwc, nwc, rtol=0, atol=0)
    assert stage1.nwc.dtype == torch.float32
    for layer in layers:  # zeroed in the bf16 model, nothing else changed
        changed = layer.weight.detach() != before[layer.name]
        assert torch.all(layer.weight.detach()[changed] == 0)


# ------------------------------------------------------------------------------------------------------------------
# 2. forward outputs as users have them
# ------------------------------------------------------------------------------------------------------------------


class WrappedOutput(ImageClassifier):
    """A classifier whose forward returns an HF ``SequenceClassifierOutput`` or a ``{"logits": ...}`` dict."""

    def __init__(self, kind: str = "hf") -> None:
        super().__init__(width=4, lr=0.05)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.model(x)
        if self.kind == "dict":
            return {"logits": logits}
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=logits)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(logits_of(self(batch[0])), batch[1])


@pytest.mark.parametrize("mode", ["penalty", "clip"])
@pytest.mark.parametrize("kind", ["hf", "dict"])
def test_model_output_and_dict_forwards(kind, mode):
    if kind == "hf":
        pytest.importorskip("transformers")
    stage1, stage2 = tsbd(**STAGE1, mode=mode)
    module = WrappedOutput(kind)
    fit(module, [stage1, stage2])
    assert stage1.report["zeroed_weights"] > 0 and stage2.steps == 4


# ------------------------------------------------------------------------------------------------------------------
# 3. the user's loss (lightning_ft_loss) in the perturbed pass and in the unlearning
# ------------------------------------------------------------------------------------------------------------------


HOOK_CALLS: list[int] = []  # module-level: counts the calls made on deep copies too


class SmoothedLoss(ImageClassifier):
    """Trains with 3 x label-smoothed cross-entropy and declares it through the ``lightning_ft_loss`` hook."""

    def __init__(self) -> None:
        super().__init__(arch="mlp", width=4, lr=0.05)

    def loss(self, batch: Any) -> torch.Tensor:
        return 3.0 * nn.functional.cross_entropy(self(batch[0]), batch[1], label_smoothing=0.3)

    def lightning_ft_loss(self, batch: Any) -> torch.Tensor:
        HOOK_CALLS.append(1)
        return self.loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)


class FirstStep(pl.Callback):
    """After the TSBD callback: the weights and batch before the first step, and the gradient it steps with."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.module, self.batch = copy.deepcopy(pl_module), batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "grads"):
            self.grads = [p.grad.detach().clone() for p in pl_module.parameters()]


def test_the_perturbed_pass_uses_the_modules_loss():
    module = SmoothedLoss()
    stage2, first = ActivenessAwareFineTuning(alpha=1.0, r=0.5), FirstStep()
    HOOK_CALLS.clear()
    fit(module, [stage2, first])
    assert len(HOOK_CALLS) == stage2.steps == 4  # one perturbed pass per step, through the hook

    # by hand: alpha 1 -> the step's gradient is the gradient of the module's loss at theta + r g1/||g1|| per tensor
    reference, batch = first.module, first.batch
    params = list(reference.parameters())
    g1 = torch.autograd.grad(reference.loss(batch), params)
    with torch.no_grad():
        for p, g in zip(params, g1, strict=True):
            p.add_(0.5 * g / (g.norm() + 1e-12))
    expected = torch.autograd.grad(reference.loss(batch), params)
    for got, want in zip(first.grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    # and not cross-entropy's gradient at that point (what the perturbed pass used to compute)
    x, y = batch
    plain = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), params)
    assert max((a - b).abs().max().item() for a, b in zip(first.grads, plain, strict=True)) > 1e-3


def test_clean_unlearning_ascends_the_modules_loss():
    stage1 = NeuronWeightChangeReinit(**STAGE1, layer_types=("linear",))
    HOOK_CALLS.clear()
    fit(SmoothedLoss(), [stage1])  # training_step does not call the hook: every call is the unlearning's
    assert stage1.report["zeroed_weights"] > 0
    assert len(HOOK_CALLS) == 4 * stage1.report["unlearn_epochs"]  # one per clean batch and epoch

    # gradient ascent on the hook's loss: one unlearning step raises it
    module, loader = SmoothedLoss(), clean_loader()
    batch = next(iter(loader))
    before = module.loss(batch).item()
    stage1_module.clean_unlearning(module, [batch], lr=1e-2, momentum=0.0, max_epochs=1, stop_acc=0.0)
    assert module.loss(batch).item() > before


# ------------------------------------------------------------------------------------------------------------------
# 4. reuse for a second fit
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["penalty", "clip"])
def test_reused_callbacks_behave_like_fresh_ones(mode, unlearning_calls):
    stage1, stage2 = tsbd(**STAGE1, mode=mode)
    fit(tiny_classifier(), [stage1, stage2])
    first_report = dict(stage1.report)
    module = tiny_classifier()
    fit(module, [stage1, stage2])
    assert len(unlearning_calls) == 2  # stage 1 ran again on the new model
    assert stage1.report == first_report  # same model, data and settings: the same selection
    assert stage2.steps == 4  # counted from 0 again


# ------------------------------------------------------------------------------------------------------------------
# 5. progress bar
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_progress_bar", [False, True])
def test_progress_bar_follows_the_trainer(enable_progress_bar, capfd):
    defaults = {k: v for k, v in STAGE1.items() if k != "progress_bar"}  # progress_bar's default: follow the Trainer
    fit(tiny_classifier(), [NeuronWeightChangeReinit(**defaults)], enable_progress_bar=enable_progress_bar)
    err = capfd.readouterr().err
    drawn = "TSBD clean unlearning" in err and "epoch/s" in err
    assert drawn == enable_progress_bar, err[-2000:]
    assert tsbd()[0].progress_bar is None


def test_progress_bar_can_be_forced(capfd):
    fit(tiny_classifier(), [NeuronWeightChangeReinit(**{**STAGE1, "progress_bar": True})])  # the Trainer has none
    assert "epoch/s" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# 6. metrics reach callback_metrics (monitorable)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "metric"), [("penalty", "backdoor/perturbed_loss"), ("clip", "backdoor/clipped_neurons")]
)
def test_metrics_reach_callback_metrics_and_can_be_monitored(mode, metric):
    stage1, stage2 = tsbd(**STAGE1, mode=mode)
    # strict EarlyStopping fails the fit when its metric is missing at the end of the epoch
    monitors = [
        EarlyStopping(monitor=name, check_on_train_epoch_end=True, patience=10, mode="max")
        for name in ("backdoor/nwc_selected_neurons", metric)
    ]
    trainer = fit(tiny_classifier(), [stage1, stage2, *monitors])
    metrics = trainer.callback_metrics
    assert metrics["backdoor/nwc_selected_neurons"].item() == stage1.report["selected_neurons"]
    assert metrics["backdoor/nwc_zeroed_weights"].item() == stage1.report["zeroed_weights"]
    assert torch.isfinite(metrics[metric]) and (metric != "backdoor/clipped_neurons" or metrics[metric].item() > 0)


# ------------------------------------------------------------------------------------------------------------------
# 7. timm ResNet and ViT: default layers, never the head
# ------------------------------------------------------------------------------------------------------------------


def tiny_vit() -> ImageClassifier:
    from timm.models.vision_transformer import VisionTransformer

    module = ImageClassifier(width=4, lr=0.01)
    module.model = VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    return module


def test_default_layers_never_include_the_head():
    pytest.importorskip("timm")
    resnet, vit = ImageClassifier(arch="test_resnet", in_channels=1), tiny_vit()
    assert set(classifier_heads(resnet)) == {"model.fc"}
    assert set(classifier_heads(vit)) == {"model.head"}
    assert set(classifier_heads(tiny_classifier())) == {"model.fc"}  # the last Linear of a plain module
    assert set(classifier_heads(tiny_mlp_classifier())) == {"model.5"}

    resnet_layers = [layer.name for layer in tsbd_layers(resnet)]
    assert resnet_layers and all(isinstance(resnet.get_submodule(n), nn.Conv2d) for n in resnet_layers)
    assert "model.fc" not in [layer.name for layer in tsbd_layers(resnet, ("conv", "linear"))]
    # a ViT's only conv is its patch embedding: auto picks the linear layers of the blocks, not the head
    vit_layers = [layer.name for layer in tsbd_layers(vit)]
    assert "model.blocks.0.mlp.fc1" in vit_layers and "model.blocks.1.mlp.fc2" in vit_layers
    assert "model.head" not in vit_layers and "model.patch_embed.proj" not in vit_layers
    assert "model.head" in [layer.name for layer in tsbd_layers(vit, exclude_head=False)]
    # an MLP: every hidden Linear, not the output layer
    assert [layer.name for layer in tsbd_layers(tiny_mlp_classifier())] == ["model.1", "model.3"]


def test_only_the_head_eligible_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"classifier head.*exclude_head=False"):
        tsbd_layers(model, ("linear",))
    with pytest.raises(ValueError, match=r"auto.*Pass `layer_types`"):
        tsbd_layers(model)


class AfterStage1(pl.Callback):
    """Placed after stage 1: the weights it left."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_stage_one_on_linear_layers_leaves_the_output_layer_alone():
    module = tiny_mlp_classifier()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    stage1, after = NeuronWeightChangeReinit(**{**STAGE1, "neuron_ratio": 0.5}, layer_types=("linear",)), AfterStage1()
    fit(module, [stage1, after])
    assert stage1.report["neurons"] == 32 + 32  # the two hidden layers, not the 10 output neurons
    assert torch.equal(after.weights["model.5.weight"], before["model.5.weight"])
    zeroed = sum(int((after.weights[f"model.{i}.weight"] == 0).sum()) for i in (1, 3))
    assert zeroed == stage1.report["zeroed_weights"] > 0


@pytest.mark.parametrize("mode", ["penalty", "clip"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_both_stages_run_on_timm_models(arch, mode):
    pytest.importorskip("timm")
    module = ImageClassifier(arch="test_resnet", in_channels=1, lr=0.01) if arch == "resnet" else tiny_vit()
    head = "model.fc" if arch == "resnet" else "model.head"
    head_before = module.get_submodule(head).weight.detach().clone()
    stage1, stage2 = tsbd(**{**STAGE1, "neuron_ratio": 0.1}, mode=mode)
    fit(module, [stage1, stage2], data={"image_size": 16})
    assert stage1.report["zeroed_weights"] > 0 and stage2.steps == 4
    assert head not in [layer.name for layer in stage1.layers(module)]
    assert head not in [layer.name for layer in stage2.layers(module)]
    assert not torch.equal(module.get_submodule(head).weight, head_before)  # trained, not selected
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ------------------------------------------------------------------------------------------------------------------
# 8. sharded strategies
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused_at_setup(name):
    import lightning.pytorch.strategies as strategies

    strategy = object.__new__(getattr(strategies, name))  # an instance without starting anything
    trainer = SimpleNamespace(strategy=strategy)
    for callback in (NeuronWeightChangeReinit(), ActivenessAwareFineTuning()):
        with pytest.raises(ValueError, match=rf"{type(callback).__name__} .*does not support {name}.*ddp"):
            callback.setup(trainer, tiny_classifier(), "fit")  # type: ignore[arg-type]
    check_strategy(SimpleNamespace(strategy=strategies.DDPStrategy()), "X")  # DDP is fine  # type: ignore[arg-type]
