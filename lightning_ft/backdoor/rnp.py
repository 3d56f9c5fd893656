"""Reconstructive Neuron Pruning (RNP, Li et al. 2023): unlearn a copy, recover BatchNorm channel masks on it, prune
the channels whose mask stays low in the original model.

The functional core follows the official code (``bboylyg/RNP``, ``main.py`` and ``models/mask_batchnorm.py``):

1. :func:`rnp_unlearn`: gradient ascent on the training loss (cross-entropy, or the module's ``lightning_ft_loss``)
   over clean data, SGD(lr 0.01, momentum 0.9, weight decay 5e-4), learning rate x0.1 at epochs 10 and 20, stopping
   when the epoch's running train-mode accuracy is at most 0.2. The official code calls ``clip_grad_norm_`` before
   ``backward`` (no effect); ``clip_norm`` clips after it.
2. :func:`rnp_recover_masks`: every BatchNorm's ``gamma`` is multiplied by a mask ``m`` (init 1, ``beta`` kept);
   only the masks train, SGD(lr 0.2, momentum 0.9) on ``alpha * CE`` for 20 epochs in train mode, clamped to [0, 1]
   after each step.
3. :func:`rnp_prune_`: ``gamma`` is set to 0 for every channel with ``m <= threshold`` in the original model (the
   channel becomes the constant ``beta``).

Both offline phases run through :class:`~lightning_ft._internal.offline.OfflinePhase` (a progress bar that follows the
Trainer's, per-epoch log lines with ``verbose``, autocast under mixed precision) and read logits and losses with the
shared helpers of :mod:`lightning_ft._internal.forward` (tensor, dict or HF ``ModelOutput`` returns; the user's loss
hook).

RNP is a backdoor defense and lives in the backdoor family; ``lightning_ft.pruning.rnp`` and the RNP names of
``lightning_ft.pruning`` are deprecated aliases (a ``FutureWarning``) kept for one release. The callback's state key
is its class name, so checkpoints written before the move resume unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft._internal.batches import clean_loader, inputs_and_labels
from lightning_ft._internal.distributed import broadcast_from_rank_zero
from lightning_ft._internal.forward import _device, has_user_loss, logits_of, model_loss
from lightning_ft._internal.logging import log_histogram, log_scalars
from lightning_ft._internal.neurons import GATE_LAYER_TYPES, NeuronLayer, find_neuron_layers
from lightning_ft._internal.offline import OfflinePhase, forward_context, working_copy
from lightning_ft._internal.resume import check_resumed_arguments, restore_legacy_state
from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.backdoor.calibration import (
    Calibration,
    Edit,
    check_calibration_arguments,
    log_calibration,
    probe_recipe,
    scan_candidates,
)

__all__ = ["DEFAULT_THRESHOLDS", "ReconstructiveNeuronPruning", "rnp_prune_", "rnp_recover_masks", "rnp_unlearn"]

_RNP_CHANGED = "its weights were pruned with other channels (RNP never runs twice in a fit)"
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The mask thresholds ``threshold="auto"`` tries, smallest first (the official sweep: 0 to 0.9 by 0.05)."""
DEFAULT_PROBE_EPOCHS = 20
"""Repair-probe epochs of ``threshold="auto"`` with fine-tuning, without a Trainer ``max_epochs``."""


def _batchnorms(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[NeuronLayer]:
    try:
        return find_neuron_layers(model, ("bn",), include, exclude, allowed=GATE_LAYER_TYPES)
    except ValueError as err:
        raise ValueError(
            f"RNP masks BatchNorm channels and found none to mask: {err} (BN-free networks are not supported.)"
        ) from None


def _loss_and_predictions(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, logits, labels)`` of ``batch``: the user's ``lightning_ft_loss`` when the module defines it (the
    logits are then read from the module's own forward inside that hook), else cross-entropy."""
    outputs: list[Any] = []
    handle = model.register_forward_hook(lambda m, i, o: outputs.append(o)) if has_user_loss(model) else None
    try:
        loss, logits, labels = model_loss(model, batch)
    finally:
        if handle is not None:
            handle.remove()
    if logits is None:  # the user's loss: RNP's stopping rule still needs the predictions
        if not outputs:
            raise ValueError(
                f"RNP's unlearning stops on the running accuracy, so it needs the logits: "
                f"{type(model).__name__}.lightning_ft_loss(batch) must compute them by calling the module itself"
                " (self(inputs)), and the batch must carry labels."
            )
        logits = logits_of(outputs[-1])
        labels = inputs_and_labels(batch)[1].to(logits.device)
    assert labels is not None
    return loss, logits, labels


def rnp_unlearn(
    model: nn.Module,
    loader: Iterable[Any],
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    max_epochs: int = 20,
    stop_acc: float = 0.2,
    clip_norm: float | None = None,
    milestones: Sequence[int] = (10, 20),
    *,
    trainer: pl.Trainer | None = None,
    progress_bar: bool | None = None,
    verbose: bool = False,
) -> tuple[int, float]:
    """RNP's clean unlearning, in place on ``model`` (pass a copy). Returns ``(epochs run, last running accuracy)``.

    The loss is the module's ``lightning_ft_loss(batch)`` when it defines one, else cross-entropy; forward outputs may
    be tensors, dicts with ``logits`` or HF ``ModelOutput``s. ``trainer`` (optional) gives the progress bar (or
    ``progress_bar`` forces it) and the autocast of mixed precision; ``verbose`` logs a line per epoch.
    """
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), 0.1)
    acc = 1.0
    context = forward_context(trainer, model)
    phase = OfflinePhase("RNP unlearning", max_epochs, trainer, progress_bar, verbose)
    try:
        for epoch in phase:
            model.train()
            correct = torch.zeros((), device=device)
            total = 0
            for batch in loader:
                with context():
                    loss, logits, labels = _loss_and_predictions(model, batch)
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                correct += (logits.detach().argmax(-1) == labels).sum()
                total += labels.numel()
            scheduler.step()
            if total == 0:
                raise ValueError("the clean data loader is empty: RNP's unlearning needs clean samples.")
            acc = float(correct) / total  # one sync per epoch
            phase.log(epoch, acc=acc)
            if acc <= stop_acc:
                return epoch, acc
    finally:
        phase.close()
    return max_epochs, acc


def _mask_hook(mask: Tensor) -> Any:
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        # BN(x; gamma * m, beta) = m * BN(x; gamma, beta) + (1 - m) * beta
        shape = (-1, *([1] * (output.dim() - 2)))
        m = mask.view(shape).to(output.dtype)
        return output * m + (1 - m) * module.bias.view(shape)

    return hook


def rnp_recover_masks(
    model: nn.Module,
    loader: Iterable[Any],
    lr: float = 0.2,
    momentum: float = 0.9,
    epochs: int = 20,
    alpha: float = 0.2,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    *,
    trainer: pl.Trainer | None = None,
    progress_bar: bool | None = None,
    verbose: bool = False,
) -> dict[str, Tensor]:
    """Learn one mask per BatchNorm channel of the (unlearned) ``model`` on clean data; returns them by layer name.

    ``model``'s own parameters are left unchanged (its BatchNorm running statistics are updated: pass a copy). The
    loss, output formats, ``trainer``, ``progress_bar`` and ``verbose`` are as in :func:`rnp_unlearn`.
    """
    device = _device(model)
    bns = _batchnorms(model, include, exclude)
    masks = {bn.name: nn.Parameter(torch.ones(bn.num_neurons, device=device)) for bn in bns}
    handles = [bn.module.register_forward_hook(_mask_hook(masks[bn.name])) for bn in bns]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(list(masks.values()), lr=lr, momentum=momentum)
    context = forward_context(trainer, model)
    phase = OfflinePhase("RNP mask recovery", epochs, trainer, progress_bar, verbose)
    try:
        model.train()
        for epoch in phase:
            total = torch.zeros((), device=device)
            batches = 0
            for batch in loader:
                with context():
                    loss = alpha * model_loss(model, batch)[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for m in masks.values():
                        m.clamp_(0.0, 1.0)
                total += loss.detach().float()
                batches += 1
            phase.log(epoch, loss=float(total) / max(batches, 1))  # one sync per epoch
    finally:
        phase.close()
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {name: m.detach() for name, m in masks.items()}


@torch.no_grad()
def rnp_prune_(model: nn.Module, masks: dict[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """Zero ``gamma`` of every BatchNorm channel whose mask is ``<= threshold`` (``beta`` kept), in place; returns
    the pruned channel indices per layer."""
    modules = dict(model.named_modules())
    pruned = {}
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"mask for {name!r}, which is not a module of the model")
        idx = (mask <= threshold).nonzero().flatten()
        modules[name].weight[idx.to(modules[name].weight.device)] = 0.0
        pruned[name] = idx.cpu()
    return pruned


class ReconstructiveNeuronPruning(Callback):
    """RNP backdoor defense: unlearn a copy on clean data, recover BatchNorm channel masks on it, and prune the
    channels whose mask stays at or below ``threshold`` in the model being trained, before its first step.

    The unlearning and the mask recovery run on a copy of the model: in float32 when the fit's precision keeps the
    weights in another dtype (``bf16-true``), under the Trainer's autocast for mixed precision, with plain BatchNorms
    (a ``sync_batchnorm=True`` model's ``SyncBatchNorm`` would wait for the other ranks, while RNP runs on rank 0
    only). Forward outputs may be tensors, dicts with ``logits`` or HF ``ModelOutput``s; a module that defines
    ``lightning_ft_loss(batch)`` has its loss unlearned and recovered on instead of cross-entropy. A callback reused
    for a second fit runs RNP again (unless that fit resumes from a checkpoint of the first). FSDP and DeepSpeed are
    refused at ``setup``.

    Backdoor channels are the ones the unlearned model can do without when it recovers clean accuracy through masks
    alone, so their masks fall (Li et al. 2023). Runs at the start of training on rank 0 (the whole clean set), and
    the pruned channel indices are broadcast so every rank prunes the same ones. With ``keep_pruned`` the pruned
    ``gamma`` are re-zeroed after every optimizer step of the following fine-tuning; ``finetune=False`` stops the fit
    right after pruning (the official protocol has no fine-tuning). Resumable: RNP never runs twice. The state is
    stored under the class name, so a resume finds it whatever unlearning, recovery or display arguments changed;
    ``threshold``, ``include`` and ``exclude`` must stay the same (else ``ValueError``).

    ``threshold="auto"`` (the default) chooses the threshold from clean data only, with TSBD's rule
    (:func:`~lightning_ft.backdoor.calibration.scan_candidates`): the largest candidate whose pruning the clean
    fine-tuning that follows repairs to within ``max_acc_drop`` of the original clean accuracy, measured on held-out
    folds by probes fine-tuned with the fit's optimizer for ``calibration_epochs`` (default: the fit's ``max_epochs``)
    with the pruned channels held at zero; with ``finetune=False`` the probes are scored as pruned, without
    fine-tuning. The masks themselves are learned on the whole clean set (the probes' held-out folds included).

    Args:
        threshold: prune channels with mask ``<= threshold`` (the official README's example: 0.2), or ``"auto"``.
        max_acc_drop, calibration_candidates, calibration_folds, calibration_epochs, calibration_seed: ``"auto"``:
            the accuracy budget, the thresholds tried (smallest first), the folds, the probes' fine-tuning epochs
            (None: the fit's ``max_epochs``) and the seed of the folds.
        unlearn_lr, unlearn_momentum, unlearn_weight_decay: SGD of the unlearning (official 0.01, 0.9, 5e-4).
        unlearn_epochs: cap on unlearning epochs (official 20).
        unlearn_stop_acc: stop when the epoch's running train-mode accuracy is at most this (official 0.2).
        unlearn_clip_norm: gradient-norm clipping of the unlearning (None: none, as the official code in effect).
        mask_lr, mask_momentum, mask_epochs, alpha: mask recovery (official 0.2, 0.9, 20, 0.2).
        include, exclude: regexes on BatchNorm names (default: all, shortcut BatchNorms included as in the code).
        keep_pruned: hold pruned ``gamma`` at 0 during the fine-tuning that follows.
        finetune: continue with the fit's fine-tuning after pruning (False: stop the fit).
        dataloader: clean ``(x, y)`` batches; default: the fit's training data, read without a distributed sampler.
        progress_bar: a progress bar per phase on rank 0 (None: when the Trainer shows one).
        verbose: a log line per epoch of each phase (accuracy of the unlearning, loss of the recovery).

    Example::

        trainer = Trainer(callbacks=[ReconstructiveNeuronPruning(threshold=0.2, finetune=False)], max_epochs=1)
        trainer.fit(classifier, clean_datamodule)

    Reference: Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023, arXiv:2305.14876.
    """

    def __init__(
        self,
        threshold: float | Literal["auto"] = "auto",
        unlearn_lr: float = 0.01,
        unlearn_momentum: float = 0.9,
        unlearn_weight_decay: float = 5e-4,
        unlearn_epochs: int = 20,
        unlearn_stop_acc: float = 0.2,
        unlearn_clip_norm: float | None = None,
        mask_lr: float = 0.2,
        mask_momentum: float = 0.9,
        mask_epochs: int = 20,
        alpha: float = 0.2,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        keep_pruned: bool = True,
        finetune: bool = True,
        dataloader: Iterable[Any] | None = None,
        progress_bar: bool | None = None,
        verbose: bool = False,
        max_acc_drop: float = 0.05,
        calibration_candidates: Sequence[float] = DEFAULT_THRESHOLDS,
        calibration_folds: int = 5,
        calibration_epochs: int | None = None,
        calibration_seed: int = 0,
    ) -> None:
        super().__init__()
        if threshold != "auto" and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"`threshold` must be in [0, 1] (masks live there) or 'auto', got {threshold!r}.")
        candidates = check_calibration_arguments(
            calibration_candidates, max_acc_drop, calibration_folds, calibration_epochs, "thresholds", zero_ok=True
        )
        if not 0.0 <= unlearn_stop_acc <= 1.0:
            raise ValueError(f"`unlearn_stop_acc` must be in [0, 1], got {unlearn_stop_acc}.")
        for name, value in (("unlearn_lr", unlearn_lr), ("mask_lr", mask_lr), ("alpha", alpha)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}.")
        if unlearn_clip_norm is not None and not unlearn_clip_norm > 0:
            raise ValueError(f"`unlearn_clip_norm` must be > 0 or None, got {unlearn_clip_norm}.")
        check_int("unlearn_epochs", unlearn_epochs)
        check_int("mask_epochs", mask_epochs)
        self.threshold: float | str = "auto" if threshold == "auto" else float(threshold)
        self.max_acc_drop, self.calibration_candidates = float(max_acc_drop), candidates
        self.calibration_folds, self.calibration_epochs = calibration_folds, calibration_epochs
        self.calibration_seed = calibration_seed
        self.unlearn_lr, self.unlearn_momentum = unlearn_lr, unlearn_momentum
        self.unlearn_weight_decay, self.unlearn_epochs = unlearn_weight_decay, unlearn_epochs
        self.unlearn_stop_acc, self.unlearn_clip_norm = unlearn_stop_acc, unlearn_clip_norm
        self.mask_lr, self.mask_momentum, self.mask_epochs, self.alpha = mask_lr, mask_momentum, mask_epochs, alpha
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.keep_pruned, self.finetune, self.dataloader = keep_pruned, finetune, dataloader
        self.progress_bar, self.verbose = progress_bar, verbose
        self._reset()

    def _reset(self) -> None:
        """The state of a fresh fit (a resumed fit's checkpointed state is loaded after ``setup``)."""
        self.done = False
        self.pruned: dict[str, Tensor] = {}
        self.report: dict[str, Any] = {}
        self.masks: dict[str, Tensor] | None = None  # the recovered masks (rank 0, not checkpointed)
        self.calibration: Calibration | None = None  # threshold="auto": the last calibration (not checkpointed)
        self.seconds: float | None = None  # wall time of RNP in this process (not checkpointed)
        self._held: list[tuple[Tensor, Tensor]] = []  # (gamma, pruned indices on its device) for keep_pruned

    @property
    @override
    def state_key(self) -> str:
        # the class name only: the state is found again whatever unlearning, recovery or display arguments changed
        # on resume; the pruning's arguments are checked in load_state_dict
        return self.__class__.__qualname__

    def _pruning_arguments(self) -> dict[str, Any]:
        """The arguments that define which channels were pruned: a resume must keep them."""
        arguments: dict[str, Any] = {"threshold": self.threshold, "include": list(self.include)}
        arguments["exclude"] = list(self.exclude)
        if self.threshold == "auto":
            arguments["max_acc_drop"] = self.max_acc_drop
        return arguments

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        _batchnorms(pl_module, self.include, self.exclude)  # fail before training on a model without BatchNorm
        # a reused callback runs RNP again; when this fit resumes, Lightning calls load_state_dict after setup
        self._reset()

    def apply(self, model: nn.Module, dataloader: Iterable[Any]) -> dict[str, Any]:
        """RNP on ``model`` in this process, without a Trainer; returns the report (``self.masks`` holds the masks)."""
        payload = self._run(model, dataloader)
        self.pruned = rnp_prune_(model, payload["masks"], payload["report"]["threshold"])
        self.report = payload["report"]
        return dict(self.report)

    def _run(self, model: nn.Module, loader: Iterable[Any], trainer: pl.Trainer | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        # the user's model is untouched until the masks exist; rank 0 runs alone on a copy with plain BatchNorms (a
        # SyncBatchNorm would wait for the other ranks), in float32 for bf16-true/16-true (see working_copy)
        unlearned = working_copy(model)
        phases = {"trainer": trainer, "progress_bar": self.progress_bar, "verbose": self.verbose}
        with torch.enable_grad(), torch.inference_mode(False):
            epochs, acc = rnp_unlearn(
                unlearned,
                loader,
                lr=self.unlearn_lr,
                momentum=self.unlearn_momentum,
                weight_decay=self.unlearn_weight_decay,
                max_epochs=self.unlearn_epochs,
                stop_acc=self.unlearn_stop_acc,
                clip_norm=self.unlearn_clip_norm,
                **phases,
            )
            masks = rnp_recover_masks(
                unlearned,
                loader,
                lr=self.mask_lr,
                momentum=self.mask_momentum,
                epochs=self.mask_epochs,
                alpha=self.alpha,
                include=self.include,
                exclude=self.exclude,
                **phases,
            )
        del unlearned
        self.masks = {k: v.cpu() for k, v in masks.items()}
        flat = torch.cat(list(self.masks.values()))
        threshold, calibrated = self.threshold, {}
        if threshold == "auto":
            self.calibration = self._calibrate(model, self.masks, loader, trainer)
            threshold, calibrated = self.calibration.value, self.calibration.report()
        report = {
            "unlearn_epochs": epochs,
            "unlearn_acc": acc,
            "channels": int(flat.numel()),
            "pruned_channels": int((flat <= float(threshold)).sum()),
            "threshold": float(threshold),
            **calibrated,
        }
        self.seconds = time.perf_counter() - start
        return {"masks": self.masks, "report": report}

    def _calibrate(
        self, model: nn.Module, masks: dict[str, Tensor], loader: Iterable[Any], trainer: pl.Trainer | None
    ) -> Calibration:
        """``threshold="auto"``: the largest candidate whose pruning (and the fine-tuning after it, unless
        ``finetune=False``) keeps held-out clean accuracy within ``max_acc_drop``."""
        epochs, optimizer, context = probe_recipe(trainer, model, self.calibration_epochs)
        flat = torch.cat(list(masks.values()))

        def edit(t: float) -> Edit:
            def prune(probe: nn.Module) -> None:
                rnp_prune_(probe, masks, t)

            return Edit(t, int((flat <= t).sum()), prune, prune if self.keep_pruned else None)

        phase = OfflinePhase(
            "RNP threshold calibration",
            len(self.calibration_candidates),
            trainer,
            progress=self.progress_bar if trainer is not None else bool(self.progress_bar),
            verbose=self.verbose,
        )
        with torch.enable_grad(), torch.inference_mode(False):
            result = scan_candidates(
                model,
                loader,  # type: ignore[arg-type]
                [edit(t) for t in self.calibration_candidates],
                max_acc_drop=self.max_acc_drop,
                folds=self.calibration_folds,
                epochs=epochs if self.finetune else 0,  # finetune=False: probes scored as pruned
                optimizer=optimizer,
                context=context,
                seed=self.calibration_seed,
                phase=phase,
                key="threshold",
                size_key="channels",
            )
        result.warn_if_outside_budget("ReconstructiveNeuronPruning(threshold='auto')", self.max_acc_drop)
        return result

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start rather than on_fit_start: the fit's training dataloader exists from here on
        if self.done:  # resumed: the pruned gamma are in the checkpoint, the indices in our state
            self._hold(pl_module)
            return
        # rank 0 runs RNP; an error there is raised on every rank (no rank waits for a broadcast that never comes)
        payload = broadcast_from_rank_zero(
            trainer, lambda: self._run(pl_module, clean_loader(trainer, self.dataloader, type(self).__name__), trainer)
        )
        self.pruned = rnp_prune_(pl_module, payload["masks"], payload["report"]["threshold"])
        self.report, self.done = payload["report"], True
        self._hold(pl_module)
        log_scalars(trainer, {f"rnp/{k}": float(v) for k, v in self.report.items() if isinstance(v, (int, float))})
        log_calibration(trainer, "rnp/calibration", self.report.get("calibration", []))
        if self.seconds is not None:
            log_scalars(trainer, {"rnp/seconds": self.seconds})
        log_histogram(trainer, "rnp/masks", torch.cat(list(payload["masks"].values())))
        rank_zero_info(f"ReconstructiveNeuronPruning: {self.report}")
        if not self.finetune:
            trainer.should_stop = True

    def _hold(self, pl_module: nn.Module) -> None:
        """The pruned gamma and their indices, moved to the model's device once (not at every step)."""
        modules = dict(pl_module.named_modules())
        weights = {name: modules[name].weight for name, idx in self.pruned.items() if idx.numel()}
        self._held = [(weight, self.pruned[name].to(weight.device)) for name, weight in weights.items()]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.keep_pruned:
            with torch.no_grad():
                for weight, idx in self._held:
                    weight.index_fill_(0, idx, 0.0)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written when the key held the threshold: load the state from there
        restore_legacy_state(self, checkpoint, self._pruning_arguments(), _RNP_CHANGED)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "pruned": dict(self.pruned),
            "report": dict(self.report),
            "arguments": self._pruning_arguments(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a state without "arguments" comes from an older checkpoint: accepted
        check_resumed_arguments(self, state_dict.get("arguments"), self._pruning_arguments(), _RNP_CHANGED)
        self.done = state_dict.get("done", False)
        self.pruned = dict(state_dict.get("pruned", {}))
        self.report = dict(state_dict.get("report", {}))
