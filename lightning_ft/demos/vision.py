"""Small image classifiers for demos and tests: a BN-CNN and a LightningModule around it or a timm model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_ft._internal.forward import logits_of
from lightning_ft.rehearsal.flow import FLOWWeightedLoss

__all__ = ["ImageClassifier", "SmallBNCNN"]


class SmallBNCNN(nn.Module):
    """``conv(1->w)-BN-ReLU / conv(w->2w)-BN-ReLU-maxpool / conv(2w->4w)-BN-ReLU / GAP / fc`` (7w conv neurons)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def mlp(in_features: int = 64, num_classes: int = 10, width: int = 128) -> nn.Module:
    """``flatten / Linear(in, w) / ReLU / Linear(w, w) / ReLU / Linear(w, classes)``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


class ImageClassifier(FLOWWeightedLoss, pl.LightningModule):
    """Cross-entropy classifier over ``(image, label)`` batches (SGD with momentum, or Adam); logs ``train_loss``,
    ``val_acc``.

    Batches ``(image, label, sample_id)`` (e.g. from a :class:`~lightning_ft.rehearsal.RehearsalDataModule`) make
    ``training_step`` also return the per-sample outputs :class:`~lightning_ft.rehearsal.RehearsalFeedback` reads,
    and FLOW-weight the loss when ``flow_weighting`` is set (e.g. by :class:`~lightning_ft.rehearsal.FLOWReweighting`;
    a plain mean otherwise).

    Args:
        arch: ``"bn_cnn"`` (:class:`SmallBNCNN`), ``"mlp"`` (:func:`mlp` on flattened 8x8 images, width ``2 * 64``
            by default) or a timm model name (built with ``pretrained=False``).
        num_classes: output classes.
        in_channels: image channels.
        width: :class:`SmallBNCNN` width.
        lr, momentum, weight_decay: optimizer settings (momentum is SGD's).
        seed: initialisation seed.
        optimizer: ``"sgd"`` or ``"adam"``.
        timm_kwargs: extra keyword arguments of ``timm.create_model`` (e.g. ``{"img_size": 8, "patch_size": 2}`` for a
            ViT on 8x8 digits).

    The forward output may be a tensor, a mapping with ``logits`` or an HF ``ModelOutput`` (subclasses that return one
    train the same way).
    """

    def __init__(
        self,
        arch: str = "bn_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
        optimizer: str = "sgd",
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if arch == "bn_cnn":
                self.model: nn.Module = SmallBNCNN(in_channels, num_classes, width)
            elif arch == "mlp":
                self.model = mlp(in_channels * 64, num_classes, 8 * width)
            else:
                import timm

                self.model = timm.create_model(
                    arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **(timm_kwargs or {})
                )
        self.lr, self.momentum, self.weight_decay, self.optimizer_name = lr, momentum, weight_decay, optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch[0], batch[1]
        logits = logits_of(self(x))
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        loss = losses.mean() if len(batch) < 3 else self.flow_loss(losses, batch[2])
        self.log("train_loss", loss, prog_bar=True)
        if len(batch) < 3:
            return loss
        correct = logits.detach().argmax(-1) == y
        return {"loss": loss, "per_sample": {"sample_id": batch[2], "correct": correct, "loss": losses.detach()}}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = logits_of(self(x))
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
