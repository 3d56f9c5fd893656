"""RehearsalDataModule: a fine-tuning data module and a rehearsal pool in mixed batches."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)
from typing_extensions import override

from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.rehearsal.budget import Budget
from lightning_ft.rehearsal.policies import Strategy
from lightning_ft.rehearsal.sampler import _HISTORY, CollateralDamageSampler
from lightning_ft.rehearsal.statistics import ReferenceStatistics, Task, WithSampleIds

__all__ = ["RehearsalDataModule", "num_tokens"]


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


class _RehearsalLoader(DataLoader):
    """The mixed-batch loader of :class:`RehearsalDataModule`. It is stateful for Lightning (``state_dict`` /
    ``load_state_dict``), which marks it as resumable mid-epoch: the sampler's position is saved and restored by the
    data module's own state, which also serves epoch-end checkpoints (Lightning restores loader states only when it
    restarts an unfinished epoch)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: :meth:`RehearsalDataModule.load_state_dict` restores the sampler."""


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


def _epoch_batches(trainer: pl.Trainer, per_epoch: int) -> int:
    """The sampler batches one epoch of the fit consumes: ``per_epoch`` under the Trainer's ``limit_train_batches``."""
    limit = trainer.limit_train_batches
    if limit is not None:
        per_epoch = min(per_epoch, int(limit)) if isinstance(limit, int) else int(per_epoch * float(limit))
    return max(1, per_epoch)


def _schedule_batches(trainer: pl.Trainer, per_epoch: int) -> tuple[int, int]:
    """The sampler batches of the whole fit (a replay schedule runs over them) and of one epoch, from the Trainer's
    limits."""
    per_epoch = _epoch_batches(trainer, per_epoch)
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


def _check_sampler_arguments(sampler_kwargs: dict[str, Any], pool_length: int) -> None:
    """The sampler's own argument checks, at once: builds and discards a sampler over a stand-in pool (zero losses,
    all prior-correct; the real size only with ``pool_groups``, whose length must match it), so a bad argument fails
    at construction rather than after the pool statistics pass."""
    size = pool_length if sampler_kwargs.get("pool_groups") is not None else 1
    tokens = sampler_kwargs.get("budget") == "tokens"
    CollateralDamageSampler(
        1,
        torch.zeros(size),
        torch.ones(size, dtype=torch.bool),
        batch_size=1,
        schedule_batches=1,
        pool_lengths=[1] * size if tokens else None,
        finetune_lengths=[1] if tokens else None,
        **sampler_kwargs,
    )


def _pool_subset(pool: Any, pool_size: int | None, seed: int) -> tuple[Dataset, Tensor | None]:
    """The pool to rehearse from, and the positions it keeps of a map-style pool (None: all of them): see
    ``RehearsalDataModule(pool_size=...)``."""
    if isinstance(pool, IterableDataset) or not (hasattr(pool, "__len__") and hasattr(pool, "__getitem__")):
        if not hasattr(pool, "__iter__"):
            raise ValueError(
                f"the rehearsal pool must be a Dataset or an iterable of samples, got {type(pool).__name__}."
            )
        if pool_size is None:
            raise ValueError(
                f"the rehearsal pool is an iterable ({type(pool).__name__}) without random access: pass `pool_size`,"
                " the number of its first samples to rehearse from (shuffle the stream first)."
            )
        return list(itertools.islice(iter(pool), pool_size)), None
    if pool_size is None or pool_size >= len(pool):
        return pool, None
    kept = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:pool_size].sort().values
    return Subset(pool, kept.tolist()), kept


class _SplitCollate:
    """Collates the fine-tuning samples (ids below ``num_finetune``) and the pool samples of a mixed batch with their
    own collate functions: ``{"finetune": ..., "replay": ...}``."""

    def __init__(self, num_finetune: int, finetune: Callable[[list[Any]], Any], pool: Callable[[list[Any]], Any]):
        self.num_finetune, self.finetune, self.pool = num_finetune, finetune, pool

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        ids = [int(s["sample_id"]) if isinstance(s, Mapping) else int(s[-1]) for s in samples]
        split = sum(i < self.num_finetune for i in ids)  # the sampler puts the fine-tuning samples first
        replay = samples[split:]
        return {"finetune": self.finetune(samples[:split]), "replay": self.pool(replay) if replay else None}


def _shuffles(loader: DataLoader, shuffle: bool | None) -> bool:
    """``shuffle``, or (None) whether ``loader`` shuffles: a ``RandomSampler`` does, a ``SequentialSampler`` not."""
    if shuffle is not None:
        return shuffle
    if isinstance(loader.sampler, RandomSampler):
        return True
    if isinstance(loader.sampler, SequentialSampler):
        return False
    raise ValueError(
        "RehearsalDataModule draws the fine-tuning order itself (a seeded DistributedSampler, so a resumed fit and"
        f" every rank get the same order), and the wrapped train_dataloader()'s {type(loader.sampler).__name__} is"
        " neither a RandomSampler nor a SequentialSampler: pass shuffle=True or shuffle=False to say which order to"
        " use."
    )


def _reference_loader(
    dataset: Dataset, batch_size: int, collate_fn: Any, num_workers: int, trainer: pl.Trainer | None
) -> DataLoader:
    """``dataset`` in order for a reference statistics pass. Under DDP only this rank's shard (a non-shuffling
    ``DistributedSampler``): :meth:`ReferenceStatistics.compute` all-gathers the shards and keeps every id once, so
    every rank gets the statistics of the whole dataset for ``1 / world_size`` of the forward passes."""
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)


def _consumed_batches(trainer: pl.Trainer | None) -> int | None:
    """The batches of the current epoch whose training step has started (Lightning's own count, also during a
    validation inside the epoch; after a mid-epoch resume it continues from the checkpoint's). None outside a fit."""
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class RehearsalDataModule(pl.LightningDataModule):
    """Wraps a fine-tuning data module and a rehearsal pool into mixed batches drawn by a
    :class:`~lightning_ft.rehearsal.CollateralDamageSampler`.

    The training data is ``ConcatDataset([finetune, pool])`` with sample ids equal to the concatenated index (appended
    to tuple samples, a ``sample_id`` entry in mapping samples; :class:`WithSampleIds`), so ``training_step`` can
    return them to :class:`RehearsalFeedback`. Validation, test and predict data come from the wrapped module.

    The pool's reference statistics (the starting model's loss and correctness on it) are computed at the start of
    the fit from the module being trained (under the Trainer's precision), unless given, and saved in checkpoints (a
    resumed fit reuses them rather than recomputing them from the resumed weights). Under DDP, use
    ``Trainer(use_distributed_sampler=False)``: the sampler shards the fine-tuning data itself.

    The sampler is built once per fit and kept when Lightning reloads the training data
    (``reload_dataloaders_every_n_epochs``), so mix-cd's rates carry on. Its state (epoch, position in the epoch,
    rates, counts) is saved in checkpoints: a fit resumed from a mid-epoch checkpoint continues with the
    next batch of the interrupted epoch, as the uninterrupted fit would. A second ``fit`` with the same data module
    starts afresh (a new sampler; statistics it computed are computed again from the new starting model) unless it
    resumes from a checkpoint. FSDP, DeepSpeed and model-parallel strategies are refused at ``setup`` when the pool
    statistics are to be computed (a pass of the unwrapped module): pass ``pool_statistics`` there.

    Args:
        datamodule: the user's fine-tuning data module (its ``train_dataloader`` gives the dataset, batch size and
            collate function).
        pool: the rehearsal pool (pretraining samples), in the same sample format.
        strategy, replay_ratio, replay_per_step, replay_schedule, num_bins, pool_groups, exclude_prior_incorrect,
            epsilon, alpha_min, alpha_init, beta, shuffle, seed: see
            :class:`~lightning_ft.rehearsal.CollateralDamageSampler` (``pool_groups``, e.g. the pool's labels, bins by
            reference loss x group; ``replay_schedule``'s progress runs over the fit's batches, from the Trainer's
            ``max_epochs`` / ``max_steps`` / ``limit_train_batches``; ``shuffle``: reshuffle the fine-tuning data
            every epoch, None: as the wrapped module's training DataLoader does, i.e. when its sampler is a
            ``RandomSampler``). They are checked at construction, by the sampler's own rules.
        budget: ``"samples"`` or ``"tokens"``: what the replay share counts (see
            :class:`~lightning_ft.rehearsal.CollateralDamageSampler`); with ``"tokens"`` every sample's tokens are
            counted once at setup (:func:`num_tokens`: the attention-mask sum of a mapping sample).
        replay_transform: applied to every rehearsed pool sample when it is loaded for training (e.g. an
            augmentation only the replay data gets): to the first element of a tuple sample (the input), to the whole
            sample otherwise (a mapping). The pool's reference statistics are computed without it.
        pool_statistics: precomputed statistics of the pool keyed by pool position (``WithSampleIds(pool)`` ids);
            None: computed at setup.
        task: ``"classification"`` or ``"causal_lm"`` for the statistics pass.
        statistics_batch_size: batch size of that pass (under DDP each rank passes its shard of the pool, and every
            rank gets the gathered statistics).
        lm_correct_threshold, correct_fn: the pass's correctness predicate (see
            :meth:`~lightning_ft.rehearsal.ReferenceStatistics.compute`): a causal-LM pool sample is prior-correct when
            its greedy next-token accuracy reaches ``lm_correct_threshold`` (report ``correct`` in ``training_step``
            with the same threshold, :func:`~lightning_ft.rehearsal.causal_lm_correct`);
            ``correct_fn(logits, batch) -> (B,) bool`` replaces the predicate.
        persistent_workers, prefetch_factor, worker_init_fn, generator: settings of the mixed-batch DataLoader
            (``torch.utils.data.DataLoader``'s); None: those of the wrapped module's training DataLoader, whose
            ``num_workers``, ``pin_memory`` and ``collate_fn`` are used too.
        pool_size: rehearse from ``pool_size`` samples of the pool only, so the statistics pass and the sampler's
            per-sample state scale with it rather than with the pool: a random subset (seeded by ``seed``, the same on
            every rank) of a map-style pool (``pool_groups`` given for the whole pool are subset with it), or the
            first ``pool_size`` samples of an iterable pool (an ``IterableDataset``, e.g. a streaming Hugging Face
            dataset: shuffle the stream first), which are then held in memory. None: the whole pool (an iterable pool
            needs a size). ``data.pool`` is the pool rehearsed from; given ``pool_statistics`` refer to it.
        pool_collate_fn: the pool's own collate function (e.g. another tokenizer, for raw pretraining text): each
            batch is then ``{"finetune": collate_fn(fine-tuning samples), "replay": pool_collate_fn(pool samples)}``
            (the layout of Lightning's ``CombinedLoader`` over two loaders; ``"replay"`` is None in a batch without
            pool samples), sample ids appended to both, and the statistics pass collates with it. None: one batch
            collated by the wrapped loader's ``collate_fn``.

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
        alpha_init: float = 1.0,
        beta: float = 0.1,
        shuffle: bool | None = None,
        seed: int = 0,
        pool_statistics: ReferenceStatistics | None = None,
        task: Task = "classification",
        statistics_batch_size: int = 256,
        lm_correct_threshold: float = 0.5,
        correct_fn: Callable[[Tensor, Any], Tensor] | None = None,
        replay_transform: Callable[[Any], Any] | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        generator: torch.Generator | None = None,
        pool_size: int | None = None,
        pool_collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        check_int("pool_size", pool_size, allow_none=True)
        if pool_collate_fn is not None and not callable(pool_collate_fn):
            raise ValueError(
                f"`pool_collate_fn` must be callable (pool samples -> a batch) or None, got {pool_collate_fn!r}."
            )
        pool, kept = _pool_subset(pool, pool_size, seed)
        if pool_groups is not None and kept is not None and len(pool_groups) != len(pool):  # type: ignore[arg-type]
            pool_groups = [pool_groups[i] for i in kept.tolist()]  # given for the whole pool: the subset's groups
        if len(pool) == 0:  # type: ignore[arg-type]
            raise ValueError("the rehearsal pool is empty: pass the pretraining samples to rehearse.")
        # argument errors now, not after the statistics pass and the token count at fit start
        if task not in get_args(Task):
            raise ValueError(f"`task` must be one of {get_args(Task)}, got {task!r}.")
        check_int("statistics_batch_size", statistics_batch_size)
        if isinstance(lm_correct_threshold, bool) or not isinstance(lm_correct_threshold, (int, float)):
            raise ValueError(f"`lm_correct_threshold` must be a number in [0, 1], got {lm_correct_threshold!r}.")
        if not 0.0 <= lm_correct_threshold <= 1.0:
            raise ValueError(f"`lm_correct_threshold` must be in [0, 1], got {lm_correct_threshold!r}.")
        for name, fn in (("correct_fn", correct_fn), ("replay_transform", replay_transform)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None, got {fn!r}.")
        if worker_init_fn is not None and not callable(worker_init_fn):
            raise ValueError(f"`worker_init_fn` must be callable (worker id -> None) or None, got {worker_init_fn!r}.")
        if persistent_workers is not None and not isinstance(persistent_workers, bool):
            raise ValueError(f"`persistent_workers` must be True, False or None, got {persistent_workers!r}.")
        check_int("prefetch_factor", prefetch_factor, allow_none=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
        self.datamodule, self.pool, self.replay_transform = datamodule, pool, replay_transform
        self.pool_size, self.pool_collate_fn = pool_size, pool_collate_fn
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
            "alpha_init": alpha_init,
            "beta": beta,
            "shuffle": shuffle,
            "seed": seed,
        }
        _check_sampler_arguments(self.sampler_kwargs, len(pool))  # type: ignore[arg-type]
        self.pool_statistics, self.task, self.statistics_batch_size = pool_statistics, task, statistics_batch_size
        self.lm_correct_threshold, self.correct_fn = float(lm_correct_threshold), correct_fn
        # DataLoader settings of the mixed-batch loader; None: the wrapped module's training DataLoader's
        self.loader_kwargs: dict[str, Any] = {
            "persistent_workers": persistent_workers,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": worker_init_fn,
            "generator": generator,
        }
        self._given_statistics = pool_statistics is not None
        self.sampler: CollateralDamageSampler | None = None
        self._sampler_key: tuple[Any, ...] | None = None  # what the sampler was built for (a reload may change it)
        self._sampler_state: dict[str, Any] | None = None  # from a checkpoint, for the sampler of the resumed fit
        self.restored_sampler = False  # this fit's sampler continues a checkpoint's (RehearsalFeedback reads it)
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
        if stage == "fit":  # a new fit: a new sampler and, unless given, new statistics (a checkpoint restores both)
            if not self._given_statistics:
                if self.trainer is not None:
                    check_strategy(
                        self.trainer,
                        "RehearsalDataModule",
                        "computes the pool statistics with a forward pass of the unwrapped module (pass precomputed"
                        " `pool_statistics` to use it under a sharded strategy)",
                    )
                self.pool_statistics = None
            self.sampler, self._sampler_key, self._sampler_state, self.restored_sampler = None, None, None, False
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        # the pool statistics of the *starting* model: a resumed fit must not recompute them from resumed weights
        if self.pool_statistics is not None:
            state.update(
                pool_loss=self.pool_statistics.loss,
                pool_correct=self.pool_statistics.correct,
                pool_ids=self.pool_statistics.sample_ids,
            )
        if self.sampler is not None:  # with the position in the epoch: a mid-epoch resume continues from there
            state["sampler"] = self.sampler.state_dict(consumed=_consumed_batches(self.trainer))
        elif self._sampler_state is not None:
            state["sampler"] = self._sampler_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "pool_loss" in state_dict:
            self.pool_statistics = ReferenceStatistics(
                state_dict["pool_ids"], state_dict["pool_loss"], state_dict["pool_correct"]
            )
        self._sampler_state = state_dict.get("sampler")

    def _statistics(self, collate_fn: Any) -> ReferenceStatistics:
        if self.pool_statistics is not None:
            return self.pool_statistics
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise ValueError("RehearsalDataModule computes the pool statistics from the model being fitted: fit it.")
        # under DDP each rank passes its shard of the pool; compute() gathers the shards on every rank
        loader = _reference_loader(WithSampleIds(self.pool), self.statistics_batch_size, collate_fn, 0, self.trainer)
        self.pool_statistics = ReferenceStatistics.compute(
            module,  # type: ignore[arg-type]
            loader,
            task=self.task,  # type: ignore[arg-type]
            lm_correct_threshold=self.lm_correct_threshold,
            correct_fn=self.correct_fn,
            trainer=self.trainer,
            desc="rehearsal pool statistics",
        )
        return self.pool_statistics

    @override
    def _loader_kwargs(self, inner: DataLoader) -> dict[str, Any]:
        """The mixed-batch DataLoader's worker settings: this module's, else the wrapped loader's; checked here."""
        inherited = {
            "persistent_workers": inner.persistent_workers,
            "prefetch_factor": inner.prefetch_factor,
            "worker_init_fn": inner.worker_init_fn,
            "generator": inner.generator,
        }
        kwargs = {key: inherited[key] if value is None else value for key, value in self.loader_kwargs.items()}
        if inner.num_workers == 0 and (kwargs["persistent_workers"] or self.loader_kwargs["prefetch_factor"]):
            raise ValueError(
                "RehearsalDataModule: `persistent_workers` and `prefetch_factor` need loader workers, but the wrapped"
                " train_dataloader() has num_workers=0; give it workers or leave both unset."
            )
        ahead = inner.num_workers * (kwargs["prefetch_factor"] or 2)
        if ahead > _HISTORY:
            raise ValueError(
                f"RehearsalDataModule: {inner.num_workers} workers x prefetch_factor {kwargs['prefetch_factor'] or 2}"
                f" read {ahead} batches ahead, more than the {_HISTORY} the sampler can draw again after a"
                " mid-epoch resume: use fewer workers or a smaller prefetch_factor."
            )
        return kwargs

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
        loader_kwargs = self._loader_kwargs(inner)  # before the pool statistics pass: bad settings fail first
        finetune = inner.dataset
        n = len(finetune)  # type: ignore[arg-type]
        schedule_batches = epoch_batches = None
        per_epoch = CollateralDamageSampler.num_batches(n, inner.batch_size, world_size, inner.drop_last)
        if trainer is not None:  # the batches an epoch consumes (limit_train_batches): the carried counts' index
            epoch_batches = _epoch_batches(trainer, per_epoch)
        if self.sampler_kwargs["replay_schedule"] is not None:
            if trainer is None:
                raise ValueError("`replay_schedule` runs over the fit's batches: use the data module in a Trainer.")
            schedule_batches, epoch_batches = _schedule_batches(trainer, per_epoch)
        lengths: dict[str, list[int]] = {}
        if self.sampler_kwargs["budget"] == "tokens":
            if self._lengths is None or len(self._lengths["finetune_lengths"]) != n:  # once per fine-tuning set
                self._lengths = {
                    "finetune_lengths": [num_tokens(finetune[i]) for i in range(n)],
                    "pool_lengths": [num_tokens(self.pool[i]) for i in range(len(self.pool))],  # type: ignore[arg-type]
                }
            lengths = self._lengths
        stats = self._statistics(inner.collate_fn if self.pool_collate_fn is None else self.pool_collate_fn)
        key = (n, inner.batch_size, inner.drop_last, rank, world_size, schedule_batches, epoch_batches)
        if self.sampler is None or key != self._sampler_key:  # once per fit; again only if the data changed
            previous = self.sampler
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
                **{**self.sampler_kwargs, "shuffle": _shuffles(inner, self.sampler_kwargs["shuffle"])},
            )
            self._sampler_key = key
            if previous is not None:  # reloaded with other fine-tuning data: the rates, counts and stream carry on
                self.sampler.load_state_dict({**previous.state_dict(), "position": 0, "pending": None})
            elif self._sampler_state is not None:  # resumed: continue the checkpoint's epoch where it stopped
                self.sampler.load_state_dict(self._sampler_state)
                self._sampler_state, self.restored_sampler = None, True
        pool = self.pool if self.replay_transform is None else _ReplayTransformed(self.pool, self.replay_transform)
        data = ConcatDataset([WithSampleIds(finetune), WithSampleIds(pool, offset=n)])
        collate_fn = inner.collate_fn
        if self.pool_collate_fn is not None:
            collate_fn = _SplitCollate(n, inner.collate_fn, self.pool_collate_fn)
        return _RehearsalLoader(
            data,
            batch_sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=inner.num_workers,
            pin_memory=inner.pin_memory,
            **loader_kwargs,
        )
