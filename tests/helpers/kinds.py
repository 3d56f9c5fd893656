"""Models as users have them, for the conformance suite: forward outputs as tensors, dicts or HF ``ModelOutput``s, a
user loss through the ``lightning_ft_loss`` hook, timm ResNet/ViT built with ``pretrained=False``, an HF causal LM
with a ``peft`` LoRA adapter.

Every factory takes no arguments and returns a fresh ``LightningModule`` (module-level classes: picklable, and
``load_from_checkpoint`` rebuilds them from their saved hyperparameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_ft.demos.models import CausalLMModule
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.models import TINY_LM

__all__ = [
    "CLASSIFIER_KINDS",
    "LM_KINDS",
    "DictClassifier",
    "LoRACausalLMModule",
    "OutputClassifier",
    "UserLossClassifier",
]


class DictClassifier(ImageClassifier):
    """The tiny BN-CNN classifier whose forward returns ``{"logits": ...}``."""

    def forward(self, x: Tensor) -> Any:
        return {"logits": self.model(x)}


class OutputClassifier(ImageClassifier):
    """The tiny BN-CNN classifier whose forward returns an HF ``ImageClassifierOutput``."""

    def forward(self, x: Tensor) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.model(x))


class UserLossClassifier(ImageClassifier):
    """The tiny BN-CNN classifier trained with label-smoothed cross-entropy, given to callbacks through the
    ``lightning_ft_loss`` hook (the one documented way to give every callback your loss)."""

    def lightning_ft_loss(self, batch: Any) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1], label_smoothing=0.2)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.lightning_ft_loss(batch)
        self.log("train_loss", loss)
        return loss


class LoRACausalLMModule(CausalLMModule):
    """:class:`CausalLMModule` whose GPT-2 is wrapped in a ``peft`` LoRA adapter (r=4 on ``c_attn``, ``c_fc``): only
    the adapter trains."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0)
        self.model = get_peft_model(self.model, config)


def _classifier(cls: type[ImageClassifier] = ImageClassifier, **overrides: Any) -> Callable[[], pl.LightningModule]:
    def make() -> pl.LightningModule:
        return cls(**{"width": 4, "lr": 0.05, **overrides})

    make.__name__ = f"make_{cls.__name__}_{overrides.get('arch', 'bn_cnn')}"
    return make


CLASSIFIER_KINDS: dict[str, Callable[[], pl.LightningModule]] = {
    "dict": _classifier(DictClassifier),
    "model_output": _classifier(OutputClassifier),
    "user_loss": _classifier(UserLossClassifier),
    "timm_resnet": _classifier(arch="test_resnet", lr=0.02),
    "timm_vit": _classifier(arch="test_vit", lr=0.02, timm_kwargs={"img_size": 8, "patch_size": 2}),
}


def _lora_lm() -> pl.LightningModule:
    return LoRACausalLMModule(**{**TINY_LM, "lr": 3e-3, "dropout": 0.0})


LM_KINDS: dict[str, Callable[[], pl.LightningModule]] = {"peft_lora": _lora_lm}
