"""Lightning callbacks of the backdoor family: TSBD stage 1 (neuron-weight-change zero reinitialisation)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_ft._internal.batches import clean_loader
from lightning_ft._internal.distributed import OfflineGroup, broadcast_from_rank_zero
from lightning_ft._internal.forward import _device, model_loss
from lightning_ft._internal.logging import log_histogram, log_scalars
from lightning_ft._internal.neurons import NeuronLayer
from lightning_ft._internal.offline import ContextFactory, OfflinePhase, forward_context, working_copy
from lightning_ft._internal.resume import check_resumed_arguments, restore_legacy_state
from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.backdoor.calibration import (
    DEFAULT_CANDIDATES,
    Calibration,
    calibrate_neuron_ratio,
    check_calibration_arguments,
    log_calibration,
    prediction_counts,
    probe_recipe,
)
from lightning_ft.backdoor.checks import (
    check_clean_batch,
    check_weight_changes,
    drop_unchanged,
    warn_eval_modules,
    warn_small_layer_share,
)
from lightning_ft.backdoor.functional import neuron_weight_changes, select_reinit_weights, zero_reinit_
from lightning_ft.backdoor.layers import check_layer_types, tsbd_layers

__all__ = ["NeuronWeightChangeReinit", "clean_unlearning"]

_NWC_CHANGED = "its weights were zeroed by another selection (stage 1 never runs twice in a fit)"


@torch.no_grad()
def _accuracy_and_classes(
    model: nn.Module,
    loader: Iterable[Any],
    context: ContextFactory = contextlib.nullcontext,
    group: OfflineGroup | None = None,
) -> tuple[float, int]:
    """Eval-mode accuracy over ``loader`` and the number of distinct predicted classes (forward passes under
    ``context()``, e.g. the Trainer's autocast); with a distributed ``group``, over every rank's ``loader``."""
    correct, total, counts = 0, 0, torch.zeros(0, dtype=torch.long)
    failed: BaseException | None = None
    try:
        correct, total, counts = prediction_counts(model, loader, context)
    except Exception as error:  # raised below, on every rank of a group
        failed = error
    if group is not None and group.distributed:
        # every rank's shard holds samples (checked before), so every rank knows the number of classes
        local = torch.cat([counts.double(), torch.tensor([float(correct), float(total)], dtype=torch.float64)])
        summed = group.sum(local.to(_device(model)), failed).cpu()
        counts, correct, total = summed[:-2], int(summed[-2]), int(summed[-1])
    elif failed is not None:
        raise failed
    if total == 0:
        raise ValueError("the clean data loader is empty: TSBD's clean unlearning needs clean samples.")
    return correct / total, int((counts > 0).sum())


def clean_unlearning(
    model: nn.Module,
    loader: Iterable[Any],
    lr: float = 1e-4,
    momentum: float = 0.9,
    max_epochs: int = 200,
    stop_acc: float = 0.10,
    stop_on_single_class: bool = True,
    progress: bool | None = False,
    trainer: pl.Trainer | None = None,
    trainer_precision: bool = True,
    verbose: bool = False,
    group: OfflineGroup | None = None,
) -> tuple[int, str]:
    """TSBD's clean unlearning, in place on ``model`` (pass a copy): gradient *ascent* on the training loss over clean
    data with SGD until eval-mode clean accuracy <= ``stop_acc``, all predictions collapse to one class, or
    ``max_epochs``. Returns ``(epochs run, rule that stopped: "accuracy" | "single_class" | "max_epochs")``.

    The loss is the module's ``lightning_ft_loss(batch)`` when it defines one, else cross-entropy of the logits
    (:func:`~lightning_ft._internal.forward.model_loss`); forward outputs may be tensors, dicts with ``"logits"`` or HF
    ``ModelOutput`` objects, and floating inputs are cast to the model's dtype.

    Args:
        progress: a progress bar over epochs (rank 0); None follows ``trainer``'s ``enable_progress_bar``.
        trainer: the fit's Trainer, if any: the progress bar and the forward context follow it.
        trainer_precision: run forward passes under the Trainer's precision context (autocast under
            ``bf16-mixed``) as :func:`~lightning_ft._internal.offline.forward_context` decides (never for the float32
            copy of a ``bf16-true`` model); False: never.
        verbose: a log line per epoch (clean accuracy, predicted classes).
        group: data-parallel unlearning (:class:`~lightning_ft._internal.distributed.OfflineGroup`): every rank steps
            on its shard of ``loader`` (a ``DataLoader`` over a map-style dataset with at least one sample per rank)
            with the gradients averaged over ranks, the stop rule counts every rank's samples, and every copy stays
            identical; None: this process alone on the whole ``loader``.

    Raises:
        ValueError: on a clean batch TSBD cannot use (:func:`~lightning_ft.backdoor.checks.check_clean_batch`).
    """
    group = group if group is not None else OfflineGroup(None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    phase = OfflinePhase("TSBD clean unlearning", max_epochs, trainer, progress=progress, verbose=verbose)
    context: ContextFactory = forward_context(trainer, model) if trainer_precision else contextlib.nullcontext
    steps, counted = group.shard(loader), group.shard(loader, pad=False)
    failed: BaseException | None = None
    try:
        check_clean_batch(model, steps, context)  # >= 2 classes, class-index labels: before any ascent step
    except ValueError as error:
        failed = error
    group.sum(torch.zeros(1, device=_device(model)), failed)  # a bad batch on any rank fails every rank
    try:
        for epoch in phase:
            model.train()
            for batch in steps:  # the padded shards give every rank the same number of steps
                failed = None
                try:
                    with context():
                        loss, _, _ = model_loss(model, batch)
                    optimizer.zero_grad(set_to_none=True)
                    (-loss).backward()
                except Exception as error:  # raised by average_gradients_, on every rank
                    failed = error
                group.average_gradients_(params, failed)
                optimizer.step()
            acc, n_classes = _accuracy_and_classes(model, counted, context, group)
            phase.log(epoch, clean_acc=acc, predicted_classes=n_classes)
            if acc <= stop_acc:
                return epoch, "accuracy"
            if stop_on_single_class and n_classes == 1:
                return epoch, "single_class"
    finally:
        phase.close()
    return max_epochs, "max_epochs"


class NeuronWeightChangeReinit(Callback):
    """TSBD stage 1: find the neurons that clean unlearning moves most and zero their largest-change weights.

    At the start of training, a copy of the model is *unlearned* on clean data (gradient ascent on the training loss
    until clean accuracy falls to ``unlearn_stop_acc``). Backdoor neurons change most under clean unlearning (their
    weight changes correlate with those of poison unlearning, Lin et al. 2024), so the ``neuron_ratio`` neurons with
    the largest weight change (raw L1 over each output channel's weights, ranked over all layers) are selected, and
    among their weights those whose change is in the top ``subweight_ratio`` (pooled threshold) are set to zero in
    the original model. Zeroed weights stay trainable: stage 2 (activeness-aware fine-tuning) repairs clean accuracy.

    The loss is the module's ``lightning_ft_loss(batch)`` when defined, else cross-entropy of the forward's logits (a
    tensor, a ``{"logits": ...}`` dict or an HF ``ModelOutput``). Under ``precision="bf16-true"`` (or fp16 weights)
    the unlearning runs on a float32 copy and the weight changes are taken in float32; under ``bf16-mixed`` the
    forward passes run under the Trainer's autocast.

    The user's weights are only touched after unlearning and selection succeeded. Under DDP the unlearning (and the
    ``auto`` calibration) is data-parallel: every rank works on its shard of the ordered clean set with the gradients
    averaged over ranks (a copy with plain BatchNorms), and rank 0's selection is broadcast, so all ranks zero the
    same weights; a clean ``dataloader`` that is not a ``DataLoader`` over a map-style dataset is unlearned on rank 0
    alone, and an error there is raised on every rank. The callback state records that
    stage 1 ran, so a fit resumed from its checkpoint does not run it again; an instance reused for a new fit starts
    afresh. The state is stored under the class name, so a resume finds it whatever unlearning or display arguments
    changed; the selection's arguments (``neuron_ratio``, ``subweight_ratio``, ``layer_types``, ``include``,
    ``exclude``, ``exclude_head``) must stay the same (else ``ValueError``). FSDP, DeepSpeed and model-parallel
    strategies are refused at ``setup``.

    Args:
        neuron_ratio: share of neurons selected, in (0, 1] (the official code sweeps it; 0.2 worked on digits).
        subweight_ratio: share of the selected neurons' weights zeroed, in (0, 1] (official: 0.7).
        lr_unlearn: SGD learning rate of the unlearning (official: 1e-4; small clean sets may need 1e-3).
        momentum: SGD momentum of the unlearning.
        max_unlearn_epochs: cap on unlearning epochs (the official loop caps at 1000 and can hang there).
        unlearn_stop_acc: stop when eval-mode clean accuracy is at or below this, in [0, 1] (official: 0.10).
        stop_on_single_class: also stop when every clean prediction is one class (the collapse that makes the
            accuracy rule never fire on small clean sets).
        layer_types: neuron layers, subset of ``("conv", "linear", "hf_conv1d")``; None (auto): the convolutions of
            a CNN (official), the linear layers of a model with fewer than two convolutions (ViT, MLP, language
            model); see :func:`~lightning_ft.backdoor.layers.tsbd_layers`.
        include: regexes a layer name must match (empty: all).
        exclude: regexes of layer names to skip (official: shortcut convs).
        dataloader: the clean data (``(x, y)`` batches); default: the fit's training data, read without a
            distributed sampler.
        progress_bar: a progress bar over unlearning epochs on rank 0; None follows the Trainer's
            ``enable_progress_bar``.
        exclude_head: never select the classifier head (timm ``get_classifier()``, HF ``get_output_embeddings()``,
            else the last registered Linear).

    Example::

        trainer = Trainer(callbacks=[NeuronWeightChangeReinit(neuron_ratio=0.2, lr_unlearn=1e-3)], max_epochs=20)
        trainer.fit(classifier, clean_datamodule)

    Reference: Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes and
    Backdoor Activeness", NeurIPS 2024, arXiv:2405.20291.
    """

    def __init__(
        self,
        neuron_ratio: float | Literal["auto"] = "auto",
        subweight_ratio: float = 0.7,
        lr_unlearn: float = 1e-4,
        momentum: float = 0.9,
        max_unlearn_epochs: int = 200,
        unlearn_stop_acc: float = 0.10,
        stop_on_single_class: bool = True,
        layer_types: Sequence[str] | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = ("shortcut", "downsample"),
        dataloader: DataLoader | None = None,
        progress_bar: bool | None = None,
        exclude_head: bool = True,
        max_acc_drop: float = 0.05,
        calibration_candidates: Sequence[float] = DEFAULT_CANDIDATES,
        calibration_folds: int = 5,
        calibration_epochs: int | None = None,
        calibration_seed: int = 0,
    ) -> None:
        super().__init__()
        ratios = [("subweight_ratio", subweight_ratio)] + (
            [] if neuron_ratio == "auto" else [("neuron_ratio", neuron_ratio)]
        )
        for name, value in ratios:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                hint = " or 'auto' (calibrated on clean data)" if name == "neuron_ratio" else ""
                raise ValueError(f"`{name}` must be in (0, 1]{hint}, got {value!r}.")
        candidates = check_calibration_arguments(
            calibration_candidates, max_acc_drop, calibration_folds, calibration_epochs, "ratios", zero_ok=False
        )
        if not 0.0 <= unlearn_stop_acc <= 1.0:
            raise ValueError(f"`unlearn_stop_acc` must be in [0, 1], got {unlearn_stop_acc}.")
        if not lr_unlearn > 0:
            raise ValueError(f"`lr_unlearn` must be > 0, got {lr_unlearn}.")
        check_int("max_unlearn_epochs", max_unlearn_epochs)
        check_layer_types(layer_types)
        self.neuron_ratio: float | str = "auto" if neuron_ratio == "auto" else float(neuron_ratio)
        self.subweight_ratio = float(subweight_ratio)
        self.max_acc_drop, self.calibration_candidates = float(max_acc_drop), candidates
        self.calibration_folds, self.calibration_epochs = calibration_folds, calibration_epochs
        self.calibration_seed = calibration_seed
        self.calibration: Calibration | None = None  # the last calibration in this process (not checkpointed)
        self.lr_unlearn, self.momentum = lr_unlearn, momentum
        self.max_unlearn_epochs, self.unlearn_stop_acc = max_unlearn_epochs, unlearn_stop_acc
        self.stop_on_single_class = stop_on_single_class
        self.layer_types = None if layer_types is None else tuple(layer_types)
        self.include, self.exclude, self.exclude_head = tuple(include), tuple(exclude), exclude_head
        self.dataloader = dataloader
        self.progress_bar = progress_bar
        self.done = False
        self.report: dict[str, Any] = {}
        self.seconds: float | None = None  # wall time of stage 1 in this process (not checkpointed)
        self.nwc: Tensor | None = None  # every neuron's weight change, in layer order (not checkpointed)
        self._loaded = False  # state given by load_state_dict that the next fit must keep

    @property
    @override
    def state_key(self) -> str:
        # the class name only: the state is found again whatever unlearning or display arguments changed on resume;
        # the selection's arguments are checked in load_state_dict
        return self.__class__.__qualname__

    def _selection_arguments(self) -> dict[str, Any]:
        """The arguments that define which weights stage 1 zeroed: a resume must keep them."""
        return {
            "neuron_ratio": self.neuron_ratio,
            "subweight_ratio": self.subweight_ratio,
            **({} if self.neuron_ratio != "auto" else {"max_acc_drop": self.max_acc_drop}),
            "layer_types": None if self.layer_types is None else list(self.layer_types),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "exclude_head": self.exclude_head,
        }

    def layers(self, model: nn.Module) -> list[NeuronLayer]:
        """The neuron layers this callback selects from on ``model``."""
        return tsbd_layers(model, self.layer_types, self.include, self.exclude, self.exclude_head)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        # a new fit starts afresh (a reused instance runs stage 1 again); Lightning restores the state of a resumed
        # fit (ckpt_path) after setup, and a state loaded by hand before the fit is kept
        if not self._loaded:
            self.done, self.report, self.seconds, self.nwc = False, {}, None, None
        warn_small_layer_share(trainer, pl_module, self.layers(pl_module), self)  # fails without eligible layers

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start rather than on_fit_start: the fit's training dataloader exists from here on
        warn_eval_modules(trainer, pl_module, self)  # once per fit, with stage 2
        self._loaded = False
        if self.done:
            return  # resumed after stage 1: never run it twice
        start = time.perf_counter()
        layers = self.layers(pl_module)
        loader = clean_loader(trainer, self.dataloader, type(self).__name__)
        group = OfflineGroup(trainer)
        if group.distributed and group.can_shard(loader) and len(loader.dataset) >= group.world_size:  # type: ignore[attr-defined]
            # data-parallel: every rank unlearns (and calibrates) on its shard in lockstep, so every rank computes the
            # same selection; rank 0's masks are broadcast all the same (the ranks then agree bit for bit)
            payload = self._select(loader, pl_module, layers, trainer, group)
            payload["masks"] = trainer.strategy.broadcast(payload["masks"], src=0)
        else:
            # rank 0 alone (one process, or clean data that cannot be sharded); an error there is raised on every
            # rank (no rank waits for a broadcast that never comes)
            payload = broadcast_from_rank_zero(trainer, lambda: self._select(loader, pl_module, layers, trainer))
        masks = {k: v.to(pl_module.device) for k, v in payload["masks"].items()}
        zeroed = zero_reinit_(layers, masks)
        self.done = True
        self.report = {**payload["report"], "zeroed_weights": zeroed}
        self.seconds = time.perf_counter() - start
        metrics = {f"backdoor/nwc_{k}": float(v) for k, v in self.report.items() if isinstance(v, (int, float))}
        metrics["backdoor/nwc_seconds"] = self.seconds
        log_scalars(trainer, metrics)
        log_calibration(trainer, "backdoor/calibration", self.report.get("calibration", []))
        if payload.get("nwc") is not None:
            self.nwc = payload["nwc"]
            log_histogram(trainer, "backdoor/nwc", payload["nwc"])
        rank_zero_info(f"NeuronWeightChangeReinit: {self.report}")

    def apply(self, model: nn.Module, dataloader: Iterable[Any]) -> dict[str, Any]:
        """Stage 1 on ``model`` in this process, without a Trainer (no fine-tuning afterwards); returns the report.

        The same unlearning, selection and in-place zeroing as in a fit, e.g. to inspect stage 1 alone.
        """
        layers = self.layers(model)
        payload = self._select(dataloader, model, layers, None)
        self.report = {**payload["report"], "zeroed_weights": zero_reinit_(layers, payload["masks"])}
        self.nwc = payload["nwc"]
        return dict(self.report)

    def _select(
        self,
        loader: Iterable[Any],
        pl_module: nn.Module,
        layers: list[NeuronLayer],
        trainer: pl.Trainer | None,
        group: OfflineGroup | None = None,
    ) -> dict[str, Any]:
        # the user's model is untouched until the selection succeeded; the copy has plain BatchNorms (each rank
        # normalises its own batches; a SyncBatchNorm would be a collective outside the fit's steps) and is float32 for
        # low-precision weights (bf16-true):
        # the original's weights converted to float32 are exactly the copy's starting point, so the changes below
        # compare float32 with float32; clean_unlearning runs it under the matching forward context
        unlearned = working_copy(pl_module)
        with torch.enable_grad(), torch.inference_mode(False):
            epochs, rule = clean_unlearning(
                unlearned,
                loader,
                lr=self.lr_unlearn,
                momentum=self.momentum,
                max_epochs=self.max_unlearn_epochs,
                stop_acc=self.unlearn_stop_acc,
                stop_on_single_class=self.stop_on_single_class,
                progress=self.progress_bar if trainer is not None else bool(self.progress_bar),
                trainer=trainer,
                verbose=trainer is not None,
                group=group,
            )
        changes = neuron_weight_changes(pl_module, unlearned, layers)
        check_weight_changes(changes, layers, self.lr_unlearn)  # all-zero NWC: an error, weights untouched
        del unlearned
        ratio, calibrated = self.neuron_ratio, {}
        if ratio == "auto":
            self.calibration = self._calibrate(pl_module, changes, loader, trainer, group)
            ratio, calibrated = self.calibration.ratio, self.calibration.report()
        masks, selected = select_reinit_weights(changes, float(ratio), self.subweight_ratio)
        masks = drop_unchanged(changes, masks)  # a weight whose change is 0 is never zeroed
        nwc = torch.cat([c.sum(1) for c in changes.values()]).cpu()
        report = {
            "unlearn_epochs": epochs,
            "stop_rule": rule,
            "neurons": int(nwc.numel()),
            "selected_neurons": int(sum(int(s.sum()) for s in selected.values())),
            "neuron_ratio": float(ratio),
            **calibrated,
        }
        return {"masks": {k: v.cpu() for k, v in masks.items()}, "report": report, "nwc": nwc}

    def _calibrate(
        self,
        pl_module: nn.Module,
        changes: dict[str, Tensor],
        loader: Iterable[Any],
        trainer: pl.Trainer | None,
        group: OfflineGroup | None = None,
    ) -> Calibration:
        """``neuron_ratio="auto"``: the largest candidate ratio whose zeroing a repair probe recovers to within
        ``max_acc_drop`` (:func:`~lightning_ft.backdoor.calibration.calibrate_neuron_ratio`)."""
        epochs, optimizer, context = probe_recipe(trainer, pl_module, self.calibration_epochs)
        phase = OfflinePhase(
            "TSBD neuron-ratio calibration",
            len(self.calibration_candidates),
            trainer,
            progress=self.progress_bar if trainer is not None else bool(self.progress_bar),
            verbose=trainer is not None,
        )
        with torch.enable_grad(), torch.inference_mode(False):
            result = calibrate_neuron_ratio(
                pl_module,
                changes,
                loader,  # type: ignore[arg-type]
                self.layers,
                subweight_ratio=self.subweight_ratio,
                candidates=self.calibration_candidates,
                max_acc_drop=self.max_acc_drop,
                folds=self.calibration_folds,
                epochs=epochs,
                optimizer=optimizer,
                context=context,
                seed=self.calibration_seed,
                phase=phase,
                group=group,
            )
        result.warn_if_outside_budget("NeuronWeightChangeReinit(neuron_ratio='auto')", self.max_acc_drop)
        return result

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loaded = False

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written when the key held neuron_ratio and subweight_ratio: load the state from there
        restore_legacy_state(self, checkpoint, self._selection_arguments(), _NWC_CHANGED)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "report": dict(self.report), "arguments": self._selection_arguments()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a state without "arguments" comes from an older checkpoint: accepted
        check_resumed_arguments(self, state_dict.get("arguments"), self._selection_arguments(), _NWC_CHANGED)
        self.done = state_dict.get("done", False)
        self.report = dict(state_dict.get("report", {}))
        self._loaded = True
