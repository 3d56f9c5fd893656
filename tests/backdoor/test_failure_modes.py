"""TSBD failure modes that used to look like normal runs (issue 11, item 3 and parts of 2): fewer than 2 classes,
labels that are not class indices, an all-zero (or partly zero) neuron-weight change, submodules left in eval mode,
a layer selection holding a small share of the weights, the head never selected on timm/HF models, and the clean
loader keeping the fit loader's settings."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lightning_ft._internal.batches import clean_loader
from lightning_ft._internal.neurons import classifier_heads
from lightning_ft.backdoor import ActivenessAwareFineTuning, NeuronWeightChangeReinit, clean_unlearning, tsbd
from lightning_ft.backdoor.checks import drop_unchanged, eval_mode_modules
from lightning_ft.backdoor.layers import SMALL_LAYER_SHARE, layer_share, tsbd_layers
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier
from tests.helpers.resume import quiet_trainer

STAGE1: dict[str, Any] = {"neuron_ratio": 0.3, "lr_unlearn": 1e-2, "max_unlearn_epochs": 2, "progress_bar": False}
EVAL_WARNING = "in eval mode when training starts"
SHARE_WARNING = "of the model's weights"


def digits_loader(n: int = 64, labels: Tensor | None = None, batch_size: int = 32) -> DataLoader:
    x, y = load_digits_tensors(8)
    return DataLoader(TensorDataset(x[:n], y[:n] if labels is None else labels[:n]), batch_size=batch_size)


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def fit(module: Any, callbacks: list[Any], **trainer_kwargs: Any) -> None:
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, small_digits_datamodule())


def messages(record: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


# ------------------------------------------------------------------------------------------------------------------
# 1. fewer than 2 output classes
# ------------------------------------------------------------------------------------------------------------------


class OneLogit(ImageClassifier):
    """A binary classifier written as one score per sample: ``(N, 1)`` (or ``(N,)`` when squeezed) logits."""

    def __init__(self, squeeze: bool = False) -> None:
        super().__init__(width=4, lr=0.05)
        self.squeeze = squeeze

    def forward(self, x: Tensor) -> Tensor:
        score = super().forward(x)[:, :1]
        return score.squeeze(-1) if self.squeeze else score

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0]).sum()


@pytest.mark.parametrize("squeeze", [False, True])
def test_fewer_than_two_classes_is_an_error_before_any_unlearning_step(squeeze):
    model = OneLogit(squeeze)
    before = params(model)
    with pytest.raises(ValueError, match="at least 2 output classes"):
        clean_unlearning(model, digits_loader(), lr=1e-2, max_epochs=2)
    assert unchanged(model, before)  # not one ascent step

    stage1 = NeuronWeightChangeReinit(**STAGE1)
    with pytest.raises(ValueError, match=r"at least 2 output classes.*shape \(32"):
        fit(model, [stage1])
    assert unchanged(model, before) and not stage1.done  # nothing zeroed


# ------------------------------------------------------------------------------------------------------------------
# 4. labels that are not class indices
# ------------------------------------------------------------------------------------------------------------------


def _labels(kind: str) -> Tensor:
    y = load_digits_tensors(8)[1][:64]
    return {
        "float": y.float(),
        "one_hot": nn.functional.one_hot(y, 10).float(),
        "column": y[:, None],
        "out_of_range": torch.where(y == 9, torch.tensor(10), y),
        "padding": torch.where(y == 9, torch.tensor(-100), y),
        "int32": y.int(),
    }[kind]


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("float", r"torch.float32 labels of shape \(32,\)"),
        ("one_hot", r"shape \(32, 10\) \(one-hot or soft labels: pass their argmax\)"),
        ("column", r"labels of shape \(32, 1\) \(torch.int64\) \(squeeze the trailing dimension\)"),
        ("out_of_range", r"labels from 0 to 10 for 10 classes"),
        ("padding", r"labels from -100 to 8 for 10 classes.*-100"),
        ("int32", r"int64 \(torch.long\).*torch.int32"),
    ],
)
def test_labels_that_are_not_class_indices_are_an_error(kind, match):
    model = tiny_classifier()
    before = params(model)
    stage1 = NeuronWeightChangeReinit(**STAGE1)
    with pytest.raises(ValueError, match=match):
        stage1.apply(model, digits_loader(labels=_labels(kind)))
    assert unchanged(model, before)


class UserLoss(ImageClassifier):
    """Declares its own loss: soft labels are then fine for the loss, not for the accuracy stop rule."""

    def lightning_ft_loss(self, batch: Any) -> Tensor:
        x, y = batch
        target = y if y.is_floating_point() else nn.functional.one_hot(y.long(), 10).float()
        return nn.functional.cross_entropy(self(x), target)


def test_a_user_loss_still_needs_class_index_labels_for_the_stop_rule():
    model = UserLoss(width=4)
    stage1 = NeuronWeightChangeReinit(**STAGE1)
    with pytest.raises(ValueError, match=r"one-hot or soft.*also when `lightning_ft_loss` computes the loss"):
        stage1.apply(model, digits_loader(labels=_labels("one_hot")))
    # the user's loss takes int32 labels (cross-entropy alone needs int64): accepted
    report = NeuronWeightChangeReinit(**STAGE1).apply(UserLoss(width=4), digits_loader(labels=_labels("int32")))
    assert report["zeroed_weights"] > 0


# ------------------------------------------------------------------------------------------------------------------
# 2. all-zero and partly zero neuron-weight changes
# ------------------------------------------------------------------------------------------------------------------


def test_frozen_eligible_layers_are_an_error_before_the_weights_are_touched():
    model = tiny_classifier()
    for layer in tsbd_layers(model):
        layer.weight.requires_grad_(False)
    before = params(model)
    with pytest.raises(ValueError, match=r"changed no weight.*every eligible layer is frozen.*features.0"):
        NeuronWeightChangeReinit(**STAGE1).apply(model, digits_loader())
    assert unchanged(model, before)  # before the fix: every weight of the selected neurons was zeroed


def test_a_too_small_unlearning_rate_is_an_error_in_a_fit():
    model = tiny_classifier(lr=0.0)
    before = params(model)
    stage1 = NeuronWeightChangeReinit(**{**STAGE1, "lr_unlearn": 1e-30, "max_unlearn_epochs": 1})
    with pytest.raises(ValueError, match=r"changed no weight.*lr_unlearn=1e-30.*raise `lr_unlearn`"):
        fit(model, [stage1])
    assert unchanged(model, before) and not stage1.done


def test_weights_whose_change_is_zero_are_never_zeroed():
    model = tiny_classifier()
    layers = tsbd_layers(model)
    frozen = layers[0]  # features.0: its change is 0; the pooled threshold reaches 0 at subweight_ratio=1
    frozen.weight.requires_grad_(False)
    kept = frozen.weight.detach().clone()
    stage1 = NeuronWeightChangeReinit(**{**STAGE1, "neuron_ratio": 1.0, "subweight_ratio": 1.0})
    with pytest.warns(UserWarning, match=r"1 eligible layer\(s\) are frozen.*features.0"):
        report = stage1.apply(model, digits_loader())
    assert torch.equal(frozen.weight, kept)  # before the fix: all 36 weights zeroed
    assert report["zeroed_weights"] == sum(int((layer.weight == 0).sum()) for layer in layers[1:]) > 0


def test_drop_unchanged_keeps_only_weights_that_moved():
    changes = {"a": torch.tensor([[0.0, 2.0], [0.0, 0.0]])}
    masks = {"a": torch.ones(2, 2, dtype=torch.bool)}
    assert drop_unchanged(changes, masks)["a"].tolist() == [[False, True], [False, False]]


# ------------------------------------------------------------------------------------------------------------------
# 3. submodules left in eval mode
# ------------------------------------------------------------------------------------------------------------------


def test_eval_mode_modules_names_the_roots_of_eval_subtrees():
    model = tiny_classifier()
    model.model.features[1].eval()
    assert eval_mode_modules(model) == ["model.features.1"]
    model.model.eval()
    assert eval_mode_modules(model) == ["model"]
    model.eval()
    assert eval_mode_modules(model) == ["<root>"]


@pytest.mark.parametrize("stages", ["both", "stage2"])
def test_submodules_in_eval_mode_at_fit_start_are_warned_once(stages):
    model = tiny_classifier(lr=0.0)
    model.model.features[1].eval()  # a BatchNorm the user put in eval mode: Lightning keeps it so
    callbacks = tsbd(**STAGE1) if stages == "both" else [ActivenessAwareFineTuning()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(model, callbacks)
    (message,) = messages(record, EVAL_WARNING)  # once, from the first TSBD callback
    owner = "NeuronWeightChangeReinit" if stages == "both" else "ActivenessAwareFineTuning"
    assert message.startswith(f"{owner}: 1 submodule(s)") and "model.features.1 (1 BatchNorm, 0 Dropout inside)" in (
        message
    )
    assert "model.train()" in message
    assert not model.model.features[1].training  # Lightning kept the mode: it really trained in eval mode


def test_no_eval_mode_warning_for_a_model_in_train_mode():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tiny_classifier(lr=0.0), tsbd(**STAGE1))
    assert not messages(record, EVAL_WARNING)


def test_stage_one_unlearns_in_train_mode_whatever_the_users_modes():
    """The working copy is put fully in train mode (clean_unlearning calls train()), so a user's eval-mode BatchNorm
    changes neither the unlearning nor the selection, and the user's modes are left as they were."""
    trained, frozen_bn = tiny_classifier(), tiny_classifier()
    frozen_bn.model.features[1].eval()
    reports = [NeuronWeightChangeReinit(**STAGE1).apply(m, digits_loader()) for m in (trained, frozen_bn)]
    assert reports[0] == reports[1]
    assert all(
        torch.equal(a, b) for a, b in zip(trained.state_dict().values(), frozen_bn.state_dict().values(), strict=True)
    )
    assert not frozen_bn.model.features[1].training and frozen_bn.model.features[4].training


# ------------------------------------------------------------------------------------------------------------------
# 5. a small share of the weights; never the head on timm and HF models
# ------------------------------------------------------------------------------------------------------------------


def test_a_selection_holding_a_small_share_of_the_weights_is_warned_at_setup():
    model = tiny_classifier(lr=0.0)
    assert layer_share(model, tsbd_layers(model, ["conv"], include=["features.0$"])) < SMALL_LAYER_SHARE
    stage1, stage2 = tsbd(**STAGE1, mode="clip", layer_types=["conv"], include=["features.0$"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(model, [stage1, stage2])
    (message,) = messages(record, SHARE_WARNING)  # stage 2 selects the same layers: not warned twice
    assert message.startswith("NeuronWeightChangeReinit: the 1 selected layer(s) hold 2.2%")
    assert "include=('features.0$',)" in message and "model.features.7.weight (1,152)" in message


def test_default_selections_are_not_warned():
    for model in (tiny_classifier(), ImageClassifier(arch="mlp", width=4)):
        assert layer_share(model, tsbd_layers(model)) > SMALL_LAYER_SHARE
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tiny_classifier(lr=0.0), tsbd(**STAGE1, mode="clip"))
    assert not messages(record, SHARE_WARNING)


def _timm(name: str, **kwargs: Any) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kwargs)


def _hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def _hf_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32, num_labels=10,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


MODELS = {
    "timm_vit": lambda: _timm("test_vit", img_size=16, patch_size=4),
    "timm_resnet": lambda: _timm("test_resnet"),
    "hf_vit": _hf_vit,
    "hf_bert": _hf_bert,
}
HEADS = {"timm_vit": "head", "timm_resnet": "fc", "hf_vit": "classifier", "hf_bert": "classifier"}


def _loader(name: str) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 10
    if name == "hf_bert":
        ids = torch.randint(0, 100, (32, 8), generator=generator)
        data = [({"input_ids": ids[i : i + 16]}, y[i : i + 16]) for i in (0, 16)]
        return DataLoader(data, batch_size=None)
    return digits_loader(32, batch_size=16) if name == "timm_resnet" else _images16(y, generator)


def _images16(y: Tensor, generator: torch.Generator) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(32, 1, 16, 16, generator=generator), y), batch_size=16)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("layer_types", [None, ("conv", "linear"), ("linear",)])
def test_the_head_is_never_selected_nor_zeroed(name, layer_types):
    model = MODELS[name]()
    head = HEADS[name]
    assert classifier_heads(model) == [head]
    if name == "timm_resnet" and layer_types == ("linear",):  # its only Linear is the head
        with pytest.raises(ValueError, match=r"only candidates are the classifier head \['fc'\]"):
            tsbd_layers(model, layer_types)
        return
    layers = tsbd_layers(model, layer_types)
    assert head not in [layer.name for layer in layers]
    assert layer_share(model, layers) > SMALL_LAYER_SHARE
    head_before = model.get_submodule(head).weight.detach().clone()
    stage1 = NeuronWeightChangeReinit(
        neuron_ratio=1.0, subweight_ratio=1.0, lr_unlearn=1e-2, max_unlearn_epochs=1, layer_types=layer_types
    )
    report = stage1.apply(model, _loader(name))
    assert report["zeroed_weights"] > 0
    assert torch.equal(model.get_submodule(head).weight, head_before)


def test_auto_selection_on_a_vit_reaches_attention_and_mlp_linears():
    model = MODELS["timm_vit"]()
    names = [layer.name for layer in tsbd_layers(model)]
    depth = len(model.blocks)
    projections = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert names == [f"blocks.{i}.{p}" for i in range(depth) for p in projections]
    hf = [layer.name for layer in tsbd_layers(MODELS["hf_vit"]())]
    assert any("attention" in n for n in hf) and any(n.endswith("mlp.fc1") or "intermediate" in n for n in hf)


# ------------------------------------------------------------------------------------------------------------------
# 6. the clean loader keeps the fit loader's settings
# ------------------------------------------------------------------------------------------------------------------


def _init_worker(worker_id: int) -> None:  # pragma: no cover - runs in workers
    pass


def test_clean_loader_keeps_the_fit_loaders_settings_but_not_its_order():
    dataset = TensorDataset(torch.arange(20.0)[:, None], torch.arange(20) % 10)
    generator = torch.Generator().manual_seed(7)
    fit_loader = DataLoader(
        dataset, batch_size=6, shuffle=True, drop_last=True, num_workers=2, pin_memory=True, timeout=30,
        worker_init_fn=_init_worker, persistent_workers=True, prefetch_factor=3, generator=generator,
        multiprocessing_context="spawn", collate_fn=torch.utils.data.default_collate,
    )  # fmt: skip
    loader = clean_loader(SimpleNamespace(train_dataloader=fit_loader), None, "Owner")
    assert isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler)
    assert loader.batch_size == 6 and loader.drop_last is False and loader.collate_fn is fit_loader.collate_fn
    assert (loader.num_workers, loader.pin_memory, loader.timeout) == (2, True, 30)
    assert loader.worker_init_fn is _init_worker and loader.persistent_workers and loader.prefetch_factor == 3
    assert loader.multiprocessing_context is fit_loader.multiprocessing_context
    assert loader.generator is not generator and torch.equal(loader.generator.get_state(), generator.get_state())


def test_clean_loader_reads_in_order_and_leaves_the_fit_generator_alone():
    dataset = TensorDataset(torch.arange(10.0), torch.arange(10))
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size=4, drop_last=True)
    fit_loader = DataLoader(dataset, batch_sampler=sampler, generator=generator)
    loader = clean_loader(SimpleNamespace(train_dataloader=fit_loader), None, "Owner")
    batches = [y.tolist() for _, y in loader]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the batch sampler's size, in order, the last one kept
    assert torch.equal(generator.get_state(), state)
    fit_loader = DataLoader(dataset, batch_size=None)
    with pytest.raises(ValueError, match=r"Owner reads the fit's training set.*batch_size=None.*`dataloader=`"):
        clean_loader(SimpleNamespace(train_dataloader=fit_loader), None, "Owner")


def test_clean_loader_without_workers_drops_worker_only_settings():
    fit_loader = DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), batch_size=2)
    loader = clean_loader(SimpleNamespace(train_dataloader=fit_loader), None, "Owner")
    assert loader.num_workers == 0 and loader.prefetch_factor is None and not loader.persistent_workers
    assert len(list(loader)) == 2
    explicit = copy.copy(fit_loader)
    assert clean_loader(SimpleNamespace(), explicit, "Owner") is explicit  # `dataloader=`: used as given
