"""FLOWReweighting: FLOW's statistics pass at the start of training, its weights installed on the module."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import (
    DataLoader,
    Subset,
)
from typing_extensions import override

from lightning_ft._internal.logging import log_scalars
from lightning_ft._internal.resume import check_resumed_arguments
from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.rehearsal.datamodule import _reference_loader, _SplitCollate
from lightning_ft.rehearsal.flow import FLOWWeightedLoss, FLOWWeighting, Level
from lightning_ft.rehearsal.functional import Normalize
from lightning_ft.rehearsal.sampler import ReplayBatchSampler
from lightning_ft.rehearsal.statistics import ReferenceStatistics, Task

__all__ = ["FLOWReweighting"]

FLOWSamples = Literal["auto", "all", "finetune"]


class FLOWReweighting(Callback):
    """FLOW without a hand-written statistics pass: at the start of training, one no-grad pass of the starting model
    over the training set gives every sample's reference loss, and the module's loss is weighted by
    ``w = exp(-ref_loss / tau)`` from then on (Sanyal et al., ICML 2025).

    The module must use :class:`~lightning_ft.rehearsal.FLOWWeightedLoss` (``self.flow_loss(losses, ids)`` or
    ``self.flow_token_loss(...)`` in ``training_step``) and its training samples must carry ids
    (:class:`~lightning_ft.rehearsal.WithSampleIds`). The pass reads the training DataLoader's dataset in order
    (under DDP each rank reads its shard and the results are all-gathered, so every rank holds the same weights),
    under the Trainer's precision (bf16 autocast, or inputs cast to the weights' dtype under ``"bf16-true"``), with a
    progress bar when the Trainer has one, and logs ``flow/tau`` and ``flow/mean_weight`` (also to
    ``trainer.callback_metrics``). The forward output may be logits, a mapping with ``"logits"`` or an HF
    ``ModelOutput``. The statistics are checkpointed: a resumed fit reuses them rather than recomputing them from
    resumed weights; a new fit with the same instance computes them afresh. FSDP, DeepSpeed and model-parallel
    strategies are refused at ``setup`` (the pass runs the unwrapped module).

    With rehearsal (FLOW + mix-cd: a :class:`RehearsalDataModule`, or a DataLoader whose batch sampler is a
    :class:`~lightning_ft.rehearsal.CollateralDamageSampler`), only the fine-tuning samples are weighted by default:
    the pass covers them alone (``tau`` is their median reference loss) and the rehearsed pool samples keep weight 1
    (``FLOWWeighting(unweighted_from=num_finetune)``), so ``self.flow_loss(losses, ids)`` over a mixed batch is
    ``mean(w_i loss_i)`` with ``w_i = 1`` for the replayed samples.

    Args:
        tau, level, normalize: see :class:`~lightning_ft.rehearsal.FLOWWeighting` (``tau`` None: the median
            reference loss).
        task: ``"classification"`` or ``"causal_lm"`` (the statistics pass; ``level="token"`` needs
            ``"causal_lm"``).
        batch_size: batch size of the pass; None: the training DataLoader's (256 when it has a batch sampler).
        samples: which training samples FLOW weights: ``"finetune"``: the fine-tuning samples of a rehearsal loader
            (rehearsed pool samples get weight 1; needs a ``CollateralDamageSampler`` batch sampler); ``"all"``: every
            sample of the training DataLoader (pool samples too); ``"auto"``: ``"finetune"`` on a rehearsal loader,
            else ``"all"``.

    Example::

        class Classifier(FLOWWeightedLoss, pl.LightningModule):
            def training_step(self, batch, batch_idx):
                x, y, ids = batch  # WithSampleIds(dataset) appends the id
                return self.flow_loss(F.cross_entropy(self(x), y, reduction="none"), ids)


        Trainer(callbacks=[FLOWReweighting()]).fit(Classifier.load_from_checkpoint("pretrained.ckpt"), loader)

    Reference: Sanyal, Prairie, Das, Kavis, Sanghavi, "Upweighting Easy Samples in Fine-Tuning Mitigates
    Forgetting", ICML 2025, arXiv:2502.02797.
    """

    def __init__(
        self,
        tau: float | None = None,
        level: Level = "sequence",
        normalize: Normalize = "none",
        task: Task = "classification",
        batch_size: int | None = None,
        samples: FLOWSamples = "auto",
    ) -> None:
        super().__init__()
        if samples not in get_args(FLOWSamples):
            raise ValueError(f"`samples` must be one of {get_args(FLOWSamples)}, got {samples!r}.")
        if tau is not None and not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"`tau` must be > 0 or None (the median reference loss), got {tau!r}.")
        if level not in ("sequence", "token"):
            raise ValueError(f'`level` must be "sequence" or "token", got {level!r}.')
        if normalize not in ("none", "mean1"):
            raise ValueError(f'`normalize` must be "none" or "mean1", got {normalize!r}.')
        if task not in ("classification", "causal_lm"):
            raise ValueError(f'`task` must be "classification" or "causal_lm", got {task!r}.')
        if level == "token" and task != "causal_lm":
            raise ValueError("level='token' weights the tokens of a causal LM: set task='causal_lm'.")
        check_int("batch_size", batch_size, allow_none=True)
        self.tau, self.level, self.normalize, self.task, self.batch_size = tau, level, normalize, task, batch_size
        self.samples = samples
        self.statistics: ReferenceStatistics | None = None
        # the first sample id weighted 1 when the statistics were computed (None: all weighted; "unknown": not recorded)
        self._unweighted_from: int | str | None = "unknown"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "FLOWReweighting", "runs its reference pass through the unwrapped module")
        if stage == "fit":  # a new fit: its own starting model and data (a checkpoint, restored after setup, keeps its)
            self.statistics, self._unweighted_from = None, "unknown"

    def _train_loader(self, trainer: pl.Trainer) -> DataLoader:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "FLOWReweighting reads the training set from the fit's single training DataLoader; for other setups"
                " compute ReferenceStatistics yourself and set `module.flow_weighting = FLOWWeighting(statistics)`."
            )
        return loader

    def _num_finetune(self, loader: DataLoader) -> int | None:
        """The fine-tuning samples of a rehearsal loader when only they are weighted (ids ``0 .. n - 1``, the
        rehearsed pool samples after them), None when every sample is."""
        sampler = loader.batch_sampler
        if self.samples == "all" or (self.samples == "auto" and not isinstance(sampler, ReplayBatchSampler)):
            return None
        if not isinstance(sampler, ReplayBatchSampler):
            raise ValueError(
                "FLOWReweighting(samples='finetune') weights the fine-tuning samples of a rehearsal loader, but the"
                f" training DataLoader's batch sampler is a {type(sampler).__name__}: train on a RehearsalDataModule"
                " (or a DataLoader with batch_sampler=CollateralDamageSampler(...)), or use samples='all'."
            )
        return sampler.num_finetune

    def _loader(self, trainer: pl.Trainer, loader: DataLoader, num_finetune: int | None) -> DataLoader:
        dataset = loader.dataset if num_finetune is None else Subset(loader.dataset, range(num_finetune))
        batch_size = self.batch_size or loader.batch_size or 256
        collate = loader.collate_fn
        if isinstance(collate, _SplitCollate):  # a pool with its own collate: the fine-tuning samples' collate
            if num_finetune is None:
                raise ValueError(
                    "FLOWReweighting(samples='all') passes the pool samples with the fine-tuning ones, but the"
                    " RehearsalDataModule collates its pool with its own `pool_collate_fn`: use samples='auto'."
                )
            collate = collate.finetune
        # under DDP each rank passes its shard; compute() gathers them
        return _reference_loader(dataset, batch_size, collate, loader.num_workers, trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, FLOWWeightedLoss):
            raise ValueError(
                f"FLOWReweighting weights the loss of a FLOWWeightedLoss module; {type(pl_module).__name__} is not one:"
                " add the mixin (class MyModule(FLOWWeightedLoss, pl.LightningModule)) and return"
                " self.flow_loss(per_sample_losses, sample_ids) from training_step."
            )
        loader = self._train_loader(trainer)
        num_finetune = self._num_finetune(loader)
        if self.statistics is not None:  # a resumed fit has them from the checkpoint: for the same weighted samples
            check_resumed_arguments(
                self,
                {"unweighted_from": self._unweighted_from} if self._unweighted_from != "unknown" else None,
                {"unweighted_from": num_finetune},
                "its statistics cover other samples (fine-tuning only, or fine-tuning and pool)",
            )
        else:
            self.statistics = ReferenceStatistics.compute(
                pl_module,
                self._loader(trainer, loader, num_finetune),
                task=self.task,
                store_token_nll=self.level == "token",
                trainer=trainer,
                desc="FLOW reference statistics",
            )
        weighting = FLOWWeighting(self.statistics, self.tau, self.level, self.normalize, unweighted_from=num_finetune)
        self._unweighted_from = num_finetune
        pl_module.flow_weighting = weighting
        log_scalars(trainer, {"flow/tau": weighting.tau, "flow/mean_weight": float(weighting.weights.nanmean())})

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.statistics is None:
            return {}
        stats = self.statistics
        state = {"sample_ids": stats.sample_ids, "loss": stats.loss, "correct": stats.correct}
        if self._unweighted_from != "unknown":  # the first id weighted 1 (None: every sample FLOW-weighted)
            state["unweighted_from"] = self._unweighted_from
        return state if stats.token_nll is None else {**state, "token_nll": stats.token_nll}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unweighted_from = state_dict.get("unweighted_from", "unknown")  # older checkpoints: unknown
        if "loss" in state_dict:
            self.statistics = ReferenceStatistics(
                state_dict["sample_ids"], state_dict["loss"], state_dict["correct"], state_dict.get("token_nll")
            )
