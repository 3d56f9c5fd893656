"""torchmetrics metrics for backdoor evaluation: attack success rate and robust accuracy."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_ft._internal.validation import check_int

__all__ = ["AttackSuccessRate", "RobustAccuracy"]


class _TriggeredAccuracy(Metric):
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    hits: Tensor
    total: Tensor

    def __init__(self, target: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        check_int("target", target, minimum=0)  # a class index
        self.target = target
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _hit(self, preds: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, labels: Tensor) -> None:
        """``preds``: logits ``(B, C)`` or class indices ``(B,)`` on triggered inputs; ``labels``: their TRUE labels.

        Samples whose true label is the target class are ignored (BackdoorBench scores non-target samples only).
        """
        if preds.dim() == 2:
            preds = preds.argmax(-1)
        if preds.shape != labels.shape:
            raise ValueError(f"`preds` {tuple(preds.shape)} and `labels` {tuple(labels.shape)} do not match.")
        keep = labels != self.target
        self.hits += self._hit(preds[keep], labels[keep]).sum()
        self.total += keep.sum()

    def compute(self) -> Tensor:
        return self.hits.float() / self.total.clamp_min(1).float()


class AttackSuccessRate(_TriggeredAccuracy):
    """Share of triggered non-target samples classified as the ``target`` class (ASR; lower is better for a defense).

    Example::

        >>> asr = AttackSuccessRate(target=0)
        >>> asr.update(torch.tensor([0, 0, 3, 0]), torch.tensor([1, 2, 3, 0]))  # the last sample is ignored
        >>> round(asr.compute().item(), 3)
        0.667
    """

    higher_is_better = False

    def _hit(self, preds: Tensor, labels: Tensor) -> Tensor:
        return preds == self.target


class RobustAccuracy(_TriggeredAccuracy):
    """Share of triggered non-target samples still classified as their true label (RA; higher is better)."""

    higher_is_better = True

    def _hit(self, preds: Tensor, labels: Tensor) -> Tensor:
        return preds == labels
