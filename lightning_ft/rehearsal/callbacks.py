"""Lightning pieces of the rehearsal family: the data-module wrapper and the feedback callback of mix-cd."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from lightning_ft._internal.logging import log_bar_chart, log_scalars
from lightning_ft._internal.validation import check_int
from lightning_ft.rehearsal.flow import FLOWWeightedLoss, FLOWWeighting, Level
from lightning_ft.rehearsal.functional import Normalize
from lightning_ft.rehearsal.sampler import Budget, CollateralDamageSampler, Strategy
from lightning_ft.rehearsal.statistics import ReferenceStatistics, Task, WithSampleIds

__all__ = ["FLOWReweighting", "RehearsalDataModule", "RehearsalFeedback", "num_tokens"]


class _ReplayTransformed(Dataset):
    """``dataset`` with ``transform`` applied to the input of every sample: the first element of a tuple or list
    sample, the whole sample otherwise (a mapping, so the transform picks its own keys)."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, (tuple, list)) and sample:
            return type(sample)([self.transform(sample[0]), *sample[1:]])
        return self.transform(sample)


def num_tokens(sample: Any) -> int:
    """Tokens of one sample: the ``attention_mask`` sum of a mapping (else its ``input_ids`` length), the length of the
    first element of a tuple, or the size of a tensor."""
    if isinstance(sample, Mapping):
        if "attention_mask" in sample:
            return int(torch.as_tensor(sample["attention_mask"]).sum())
        if "input_ids" in sample:
            return int(torch.as_tensor(sample["input_ids"]).numel())
    elif isinstance(sample, (tuple, list)) and sample:
        return int(torch.as_tensor(sample[0]).numel())
    elif isinstance(sample, Tensor):
        return int(sample.numel())
    raise ValueError(
        f"cannot count the tokens of a {type(sample).__name__} sample: `budget='tokens'` expects mappings with"
        " 'attention_mask' or 'input_ids', tuples whose first element is the token sequence, or tensors."
    )


def _schedule_batches(trainer: pl.Trainer, per_epoch: int) -> tuple[int, int]:
    """The sampler batches of the whole fit (a replay schedule runs over them) and of one epoch, from the Trainer's
    limits."""
    limit = trainer.limit_train_batches
    if limit is not None:
        per_epoch = min(per_epoch, int(limit)) if isinstance(limit, int) else int(per_epoch * float(limit))
    totals = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        totals.append(trainer.max_epochs * per_epoch)
    if trainer.max_steps >= 0:  # an epoch ends with an optimizer step even when its last accumulation is short
        steps_per_epoch = math.ceil(per_epoch / trainer.accumulate_grad_batches)
        epochs, rest = divmod(trainer.max_steps, steps_per_epoch)
        totals.append(epochs * per_epoch + min(rest * trainer.accumulate_grad_batches, per_epoch))
    if not totals:
        raise ValueError(
            "`replay_schedule` runs over the whole fit, which has no end here: give the Trainer max_epochs or"
            " max_steps."
        )
    return max(1, min(totals)), max(1, per_epoch)


class RehearsalDataModule(pl.LightningDataModule):
    """Wraps a fine-tuning data module and a rehearsal pool into mixed batches drawn by a
    :class:`~lightning_ft.rehearsal.CollateralDamageSampler`.

    The training data is ``ConcatDataset([finetune, pool])`` with sample ids equal to the concatenated index (appended
    to tuple samples, a ``sample_id`` entry in mapping samples; :class:`WithSampleIds`), so ``training_step`` can
    return them to :class:`RehearsalFeedback`. Validation, test and predict data come from the wrapped module.

    The pool's reference statistics (the starting model's loss and correctness on it) are computed at the start of
    the fit from the module being trained, unless given, and saved in checkpoints (a resumed fit reuses them rather
    than recomputing them from the resumed weights). Under DDP, use ``Trainer(use_distributed_sampler=False)``:
    the sampler shards the fine-tuning data itself.

    Args:
        datamodule: the user's fine-tuning data module (its ``train_dataloader`` gives the dataset, batch size and
            collate function).
        pool: the rehearsal pool (pretraining samples), in the same sample format.
        strategy, replay_ratio, replay_per_step, replay_schedule, num_bins, pool_groups, exclude_prior_incorrect,
            epsilon, alpha_min, beta, seed: see :class:`~lightning_ft.rehearsal.CollateralDamageSampler`
            (``pool_groups``, e.g. the pool's labels, bins by reference loss x group; ``replay_schedule``'s progress
            runs over the fit's batches, from the Trainer's ``max_epochs`` / ``max_steps`` / ``limit_train_batches``).
        budget: ``"samples"`` or ``"tokens"``: what the replay share counts (see
            :class:`~lightning_ft.rehearsal.CollateralDamageSampler`); with ``"tokens"`` every sample's tokens are
            counted once at setup (:func:`num_tokens`: the attention-mask sum of a mapping sample).
        replay_transform: applied to every rehearsed pool sample when it is loaded for training (e.g. an
            augmentation only the replay data gets): to the first element of a tuple sample (the input), to the whole
            sample otherwise (a mapping). The pool's reference statistics are computed without it.
        pool_statistics: precomputed statistics of the pool keyed by pool position (``WithSampleIds(pool)`` ids);
            None: computed at setup.
        task: ``"classification"`` or ``"causal_lm"`` for the statistics pass.
        statistics_batch_size: batch size of that pass.

    Example::

        data = RehearsalDataModule(task_b_datamodule, pool=task_a_train, replay_ratio=0.1)
        Trainer(callbacks=[RehearsalFeedback()]).fit(model, data)  # model returns "per_sample" outputs
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        pool: Dataset,
        strategy: Strategy = "mixcd",
        replay_ratio: float = 0.25,
        replay_per_step: int | None = None,
        replay_schedule: Sequence[Sequence[float]] | None = None,
        budget: Budget = "samples",
        num_bins: int = 10,
        pool_groups: Sequence[int] | None = None,
        exclude_prior_incorrect: bool = True,
        epsilon: float = 0.05,
        alpha_min: float = 0.01,
        beta: float = 0.1,
        seed: int = 0,
        pool_statistics: ReferenceStatistics | None = None,
        task: str = "classification",
        statistics_batch_size: int = 256,
        replay_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        if len(pool) == 0:  # type: ignore[arg-type]
            raise ValueError("the rehearsal pool is empty: pass the pretraining samples to rehearse.")
        # argument errors now, not after the statistics pass and the token count at fit start
        CollateralDamageSampler._check_schedule(replay_schedule, replay_per_step, 1)
        CollateralDamageSampler._check_budget(budget, replay_per_step)
        if replay_transform is not None and not callable(replay_transform):
            raise ValueError(f"`replay_transform` must be callable (sample input -> input), got {replay_transform!r}.")
        self.datamodule, self.pool, self.replay_transform = datamodule, pool, replay_transform
        self.sampler_kwargs: dict[str, Any] = {
            "strategy": strategy,
            "replay_ratio": replay_ratio,
            "replay_per_step": replay_per_step,
            "replay_schedule": None if replay_schedule is None else [list(point) for point in replay_schedule],
            "budget": budget,
            "num_bins": num_bins,
            "pool_groups": None if pool_groups is None else [int(g) for g in pool_groups],
            "exclude_prior_incorrect": exclude_prior_incorrect,
            "epsilon": epsilon,
            "alpha_min": alpha_min,
            "beta": beta,
            "seed": seed,
        }
        self.pool_statistics, self.task, self.statistics_batch_size = pool_statistics, task, statistics_batch_size
        self.sampler: CollateralDamageSampler | None = None
        self._lengths: dict[str, list[int]] | None = None
        # the wrapped module's own evaluation loaders, bound as they are: Lightning runs a loop only for the loaders
        # a data module overrides, and sees the wrapped module's (non-)overrides through these
        self.val_dataloader = datamodule.val_dataloader  # type: ignore[method-assign]
        self.test_dataloader = datamodule.test_dataloader  # type: ignore[method-assign]
        self.predict_dataloader = datamodule.predict_dataloader  # type: ignore[method-assign]

    @override
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    @override
    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the pool statistics of the *starting* model: a resumed fit must not recompute them from resumed weights
        if self.pool_statistics is None:
            return {}
        return {
            "pool_loss": self.pool_statistics.loss,
            "pool_correct": self.pool_statistics.correct,
            "pool_ids": self.pool_statistics.sample_ids,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "pool_loss" in state_dict:
            self.pool_statistics = ReferenceStatistics(
                state_dict["pool_ids"], state_dict["pool_loss"], state_dict["pool_correct"]
            )

    def _statistics(self, collate_fn: Any) -> ReferenceStatistics:
        if self.pool_statistics is not None:
            return self.pool_statistics
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise ValueError("RehearsalDataModule computes the pool statistics from the model being fitted: fit it.")
        loader = DataLoader(WithSampleIds(self.pool), batch_size=self.statistics_batch_size, collate_fn=collate_fn)
        self.pool_statistics = ReferenceStatistics.compute(module, loader, task=self.task)  # type: ignore[arg-type]
        return self.pool_statistics

    @override
    def train_dataloader(self) -> DataLoader:
        inner = self.datamodule.train_dataloader()
        if not isinstance(inner, DataLoader) or inner.batch_size is None:
            raise ValueError(
                "RehearsalDataModule needs the wrapped module's train_dataloader() to be one DataLoader with a batch"
                " size (no batch sampler of its own)."
            )
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:  # type: ignore[union-attr]
            raise ValueError(
                "RehearsalDataModule shards the fine-tuning data itself: create the Trainer with"
                " use_distributed_sampler=False."
            )
        finetune = inner.dataset
        n = len(finetune)  # type: ignore[arg-type]
        schedule_batches = epoch_batches = None
        if self.sampler_kwargs["replay_schedule"] is not None:
            if trainer is None:
                raise ValueError("`replay_schedule` runs over the fit's batches: use the data module in a Trainer.")
            per_epoch = CollateralDamageSampler.num_batches(n, inner.batch_size, world_size, inner.drop_last)
            schedule_batches, epoch_batches = _schedule_batches(trainer, per_epoch)
        lengths: dict[str, list[int]] = {}
        if self.sampler_kwargs["budget"] == "tokens":
            if self._lengths is None:  # once: datasets are not re-tokenised between epochs
                self._lengths = {
                    "finetune_lengths": [num_tokens(finetune[i]) for i in range(n)],
                    "pool_lengths": [num_tokens(self.pool[i]) for i in range(len(self.pool))],  # type: ignore[arg-type]
                }
            lengths = self._lengths
        stats = self._statistics(inner.collate_fn)
        pos = stats.positions(torch.arange(len(self.pool)))  # type: ignore[arg-type]
        self.sampler = CollateralDamageSampler(
            n,
            stats.loss[pos],
            stats.correct[pos],
            batch_size=inner.batch_size,
            drop_last=inner.drop_last,
            rank=rank,
            world_size=world_size,
            schedule_batches=schedule_batches,
            epoch_batches=epoch_batches,
            **lengths,
            **self.sampler_kwargs,
        )
        pool = self.pool if self.replay_transform is None else _ReplayTransformed(self.pool, self.replay_transform)
        data = ConcatDataset([WithSampleIds(finetune), WithSampleIds(pool, offset=n)])
        return DataLoader(
            data,
            batch_sampler=self.sampler,
            collate_fn=inner.collate_fn,
            num_workers=inner.num_workers,
            pin_memory=inner.pin_memory,
        )


class RehearsalFeedback(Callback):
    """Feeds mix-cd: after every training batch, reports which rehearsed pool samples were forgotten.

    ``training_step`` must return ``{"loss": loss, "per_sample": {"sample_id": ids, "correct": correct,
    "loss": losses}}`` with one (detached) entry per sample of the batch: ``sample_id`` the ids the
    :class:`RehearsalDataModule` appends, ``correct`` whether the current model got the sample right (from the logits
    it already computed: no extra inference), ``loss`` optional. A rehearsed sample is *forgotten* when the starting
    model got it right and the current one does not. Under DDP the flags are all-gathered, so every rank's sampler
    holds the same rates.

    Logs ``rehearsal/cd_hit_rate`` (share of this step's rehearsed samples that were forgotten), ``rehearsal/
    replay_loss`` (their mean loss, when given) every ``log_every_n_steps``, and the per-bin rates
    ``rehearsal/alpha_<k>`` at epoch ends (and as a bar chart ``rehearsal/alpha_by_bin`` on W&B, a table on
    TensorBoard). The sampler's state (rates, counts, generator) is checkpointed here.

    Args:
        log_every_n_steps: logging cadence of the per-step values.

    Example::

        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            logits = self(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            per_sample = {"sample_id": ids, "correct": logits.argmax(-1) == y, "loss": losses.detach()}
            return {"loss": losses.mean(), "per_sample": per_sample}
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"`log_every_n_steps` must be an integer >= 1, got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self._pending: dict[str, Any] | None = None
        self._sampler: CollateralDamageSampler | None = None

    def _find_sampler(self, trainer: pl.Trainer) -> CollateralDamageSampler:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, CollateralDamageSampler):
            raise ValueError(
                "RehearsalFeedback found no CollateralDamageSampler in the training DataLoader: train on a"
                " RehearsalDataModule (or a DataLoader with batch_sampler=CollateralDamageSampler(...))."
            )
        return sampler

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self._find_sampler(trainer)
        if self._pending is not None:  # resumed: restore the rates, counts and generator
            sampler.load_state_dict(self._pending)
            self._pending = None
        sampler.set_epoch(trainer.current_epoch)  # Lightning only sets the epoch on samplers, not batch samplers
        self._sampler = sampler

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sampler = self._sampler
        assert sampler is not None
        per_sample = outputs.get("per_sample") if isinstance(outputs, dict) else None
        if not isinstance(per_sample, dict) or "sample_id" not in per_sample or "correct" not in per_sample:
            raise ValueError(
                "RehearsalFeedback needs training_step to return {'loss': ..., 'per_sample': {'sample_id': ids,"
                " 'correct': bool per sample, 'loss': optional per-sample loss}}; got"
                f" {type(outputs).__name__} {sorted(outputs) if isinstance(outputs, dict) else ''}."
            )
        ids = torch.as_tensor(per_sample["sample_id"]).detach().flatten()
        correct = torch.as_tensor(per_sample["correct"]).detach().flatten().bool().to(ids.device)
        if correct.shape != ids.shape:
            raise ValueError(f"per_sample 'correct' has {correct.numel()} entries for {ids.numel()} sample ids.")
        log = trainer.global_step % self.log_every_n_steps == 0
        losses = per_sample.get("loss") if log else None
        if losses is not None:
            losses = torch.as_tensor(losses).detach().flatten()
            if losses.shape != ids.shape:
                raise ValueError(f"per_sample 'loss' has {losses.numel()} entries for {ids.numel()} sample ids.")
        if trainer.world_size > 1:
            if sampler.budget == "tokens":  # the ranks rehearse different numbers of samples: pad to the longest
                size = int(trainer.strategy.all_gather(torch.tensor(ids.numel(), device=ids.device)).max())
                pad = size - ids.numel()
                ids = torch.cat([ids, ids.new_full((pad,), -1)])  # -1: below every pool id, dropped below
                correct = torch.cat([correct, correct.new_zeros(pad)])
                losses = None if losses is None else torch.cat([losses, losses.new_zeros(pad)])
            ids = trainer.strategy.all_gather(ids).flatten()
            correct = trainer.strategy.all_gather(correct).flatten()
            if losses is not None:  # the logging steps are the same on every rank
                losses = trainer.strategy.all_gather(losses).flatten()
        # one host copy per step (the rates steer the next draws); the bookkeeping is NumPy on a few dozen values
        ids_np = ids.cpu().numpy().astype(np.int64, copy=False)
        replay = ids_np >= sampler.num_finetune
        positions = ids_np[replay] - sampler.num_finetune
        forgot = sampler.forgotten(positions, correct.cpu().numpy().astype(bool, copy=False)[replay])
        sampler.update(positions, forgot)
        if log and positions.size:
            metrics = {"rehearsal/cd_hit_rate": float(forgot.mean())}
            if losses is not None:
                metrics["rehearsal/replay_loss"] = float(losses.float().cpu().numpy()[replay].mean())
            log_scalars(trainer, metrics)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sampler is not None and self._sampler.strategy == "mixcd":
            rates = [float(a) for a in self._sampler.alpha]
            alphas = {f"rehearsal/alpha_{k}": a for k, a in enumerate(rates)}
            log_scalars(trainer, {**alphas, "rehearsal/cd_hit_rate_total": self._sampler.hit_rate})
            log_bar_chart(trainer, "rehearsal/alpha_by_bin", [f"bin {k}" for k in range(len(rates))], rates)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._sampler is not None:
            return {"sampler": self._sampler.state_dict()}
        return {"sampler": self._pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("sampler")


class FLOWReweighting(Callback):
    """FLOW without a hand-written statistics pass: at the start of training, one no-grad pass of the starting model
    over the training set gives every sample's reference loss, and the module's loss is weighted by
    ``w = exp(-ref_loss / tau)`` from then on (Sanyal et al., ICML 2025).

    The module must use :class:`~lightning_ft.rehearsal.FLOWWeightedLoss` (``self.flow_loss(losses, ids)`` or
    ``self.flow_token_loss(...)`` in ``training_step``) and its training samples must carry ids
    (:class:`~lightning_ft.rehearsal.WithSampleIds`). The pass reads the training DataLoader's dataset in order
    (under DDP each rank reads its shard and the results are all-gathered, so every rank holds the same weights) and
    logs ``flow/tau`` and ``flow/mean_weight``. The statistics are checkpointed: a resumed fit reuses them rather than
    recomputing them from resumed weights.

    Args:
        tau, level, normalize: see :class:`~lightning_ft.rehearsal.FLOWWeighting` (``tau`` None: the median
            reference loss).
        task: ``"classification"`` or ``"causal_lm"`` (the statistics pass; ``level="token"`` needs
            ``"causal_lm"``).
        batch_size: batch size of the pass; None: the training DataLoader's (256 when it has a batch sampler).

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
    ) -> None:
        super().__init__()
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
        self.statistics: ReferenceStatistics | None = None
        self._restored = False  # statistics from a checkpoint: keep them for this fit

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._restored:  # a new fit with this instance: its own starting model and data
            self.statistics = None
        self._restored = False

    def _loader(self, trainer: pl.Trainer) -> DataLoader:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "FLOWReweighting reads the training set from the fit's single training DataLoader; for other setups"
                " compute ReferenceStatistics yourself and set `module.flow_weighting = FLOWWeighting(statistics)`."
            )
        sampler = None
        if trainer.world_size > 1:  # each rank passes its shard; compute() gathers them
            sampler = DistributedSampler(
                loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            loader.dataset,
            batch_size=self.batch_size or loader.batch_size or 256,
            sampler=sampler,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, FLOWWeightedLoss):
            raise ValueError(
                f"FLOWReweighting weights the loss of a FLOWWeightedLoss module; {type(pl_module).__name__} is not one:"
                " add the mixin (class MyModule(FLOWWeightedLoss, pl.LightningModule)) and return"
                " self.flow_loss(per_sample_losses, sample_ids) from training_step."
            )
        if self.statistics is None:  # a resumed fit has them from the checkpoint
            self.statistics = ReferenceStatistics.compute(
                pl_module,
                self._loader(trainer),
                task=self.task,
                store_token_nll=self.level == "token",
                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            )
        weighting = FLOWWeighting(self.statistics, self.tau, self.level, self.normalize)
        pl_module.flow_weighting = weighting
        log_scalars(trainer, {"flow/tau": weighting.tau, "flow/mean_weight": float(weighting.weights.nanmean())})

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.statistics is None:
            return {}
        stats = self.statistics
        state = {"sample_ids": stats.sample_ids, "loss": stats.loss, "correct": stats.correct}
        return state if stats.token_nll is None else {**state, "token_nll": stats.token_nll}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "loss" in state_dict:
            self.statistics = ReferenceStatistics(
                state_dict["sample_ids"], state_dict["loss"], state_dict["correct"], state_dict.get("token_nll")
            )
            self._restored = True
