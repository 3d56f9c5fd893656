"""``tsbd(...)``: both TSBD callbacks configured as the paper's official code, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch.utils.data import DataLoader

from lightning_ft.backdoor.activeness import ActivenessAwareFineTuning, Mode, Norm
from lightning_ft.backdoor.calibration import DEFAULT_CANDIDATES
from lightning_ft.backdoor.callbacks import NeuronWeightChangeReinit

__all__ = ["tsbd"]


def tsbd(
    dataloader: DataLoader | None = None,
    neuron_ratio: float | Literal["auto"] = "auto",
    subweight_ratio: float = 0.7,
    lr_unlearn: float = 1e-4,
    max_unlearn_epochs: int = 200,
    unlearn_stop_acc: float = 0.10,
    stop_on_single_class: bool = True,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = ("shortcut", "downsample"),
    mode: Mode = "penalty",
    alpha: float = 0.7,
    r: float = 0.05,
    norm: Norm = "per_tensor",
    eps: float = 1e-12,
    clip_factor: float = 1.0,
    progress_bar: bool | None = None,
    exclude_head: bool = True,
    max_acc_drop: float = 0.05,
    calibration_candidates: Sequence[float] = DEFAULT_CANDIDATES,
    calibration_folds: int = 5,
    calibration_epochs: int | None = None,
) -> list[NeuronWeightChangeReinit | ActivenessAwareFineTuning]:
    """TSBD's two stages as ``[NeuronWeightChangeReinit(...), ActivenessAwareFineTuning(...)]``.

    Stage 1 zeroes the largest-change weights of the neurons that clean unlearning moves most, at train start; stage
    2 fine-tunes with the gradient-norm penalty (``mode="penalty"``) or per-neuron gradient clipping (``"clip"``).
    The neuron layers of both stages are the same (``layer_types``, ``include``, ``exclude``, ``exclude_head``;
    by default the convolutions of a CNN or the linear layers of a ViT/MLP, never the classifier head). Defaults are the
    official code's, except ``neuron_ratio`` (swept there with knowledge of the attack; here ``"auto"`` chooses it
    from clean data only: :mod:`lightning_ft.backdoor.calibration`) and the unlearning cap. The paper
    fine-tunes with ``SGD(lr=0.01, momentum=0.9)`` for 21 epochs on the clean set: configure your module and Trainer
    that way, or keep yours.

    Args:
        dataloader: stage 1's clean data; default: the fit's training data.
        neuron_ratio, subweight_ratio, lr_unlearn, max_unlearn_epochs, unlearn_stop_acc, stop_on_single_class,
            layer_types, include, exclude, progress_bar, exclude_head, max_acc_drop, calibration_candidates,
            calibration_folds, calibration_epochs: see :class:`NeuronWeightChangeReinit`.
        mode, alpha, r, norm, eps, clip_factor: see :class:`ActivenessAwareFineTuning`.

    Example::

        trainer = Trainer(callbacks=tsbd(lr_unlearn=1e-3), max_epochs=21)
        trainer.fit(classifier, clean_datamodule)

    Reference: Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes and
    Backdoor Activeness", NeurIPS 2024, arXiv:2405.20291.
    """
    return [
        NeuronWeightChangeReinit(
            neuron_ratio=neuron_ratio,
            subweight_ratio=subweight_ratio,
            lr_unlearn=lr_unlearn,
            max_unlearn_epochs=max_unlearn_epochs,
            unlearn_stop_acc=unlearn_stop_acc,
            stop_on_single_class=stop_on_single_class,
            layer_types=layer_types,
            include=include,
            exclude=exclude,
            dataloader=dataloader,
            progress_bar=progress_bar,
            exclude_head=exclude_head,
            max_acc_drop=max_acc_drop,
            calibration_candidates=calibration_candidates,
            calibration_folds=calibration_folds,
            calibration_epochs=calibration_epochs,
        ),
        ActivenessAwareFineTuning(
            alpha=alpha,
            r=r,
            norm=norm,
            eps=eps,
            mode=mode,
            clip_factor=clip_factor,
            layer_types=layer_types,
            include=include,
            exclude=exclude,
            exclude_head=exclude_head,
        ),
    ]
