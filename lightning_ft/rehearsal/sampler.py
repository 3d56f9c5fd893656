"""Rehearsal batch samplers: pool samples mixed into every fine-tuning batch.

:class:`ReplayBatchSampler` wraps any fine-tuning batch sampler (a ``BatchSampler`` over a ``DistributedSampler``
under DDP, so the sharding is torch's) and appends to each of its batches the pool samples a
:class:`~lightning_ft.rehearsal.ReplayPolicy` draws, as many as a :class:`~lightning_ft.rehearsal.ReplayBudget` gives
the batch. The draws of a batch are seeded by (seed, epoch, batch, rank): a resumed fit needs only the policy's state
and its position to draw what the uninterrupted fit draws. :class:`CollateralDamageSampler` builds one from the pool's
reference statistics and the fine-tuning set's size (mix-cd, Bai et al., Findings of NAACL 2025, and its baselines).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from lightning_ft._internal.validation import check_int
from lightning_ft.rehearsal.budget import Budget, ReplayBudget
from lightning_ft.rehearsal.policies import STRATEGIES, MixCDPolicy, ReplayPolicy, Strategy, _host, make_policy

__all__ = ["STRATEGIES", "CollateralDamageSampler", "ReplayBatchSampler"]

# batches a data loader may draw ahead of the training (its workers' prefetch) that a checkpoint can still reproduce
_HISTORY = 64
_DIRECT = 0x5EED  # the stream of draw() calls made outside an iteration


def _lengths(name: str, values: Sequence[int] | Tensor | None, expected: int) -> np.ndarray:
    if values is None:
        raise ValueError(f"`budget='tokens'` needs `{name}`: the number of tokens of every sample.")
    lengths = _host(values).ravel()
    if lengths.size != expected or not np.issubdtype(lengths.dtype, np.integer) or (lengths < 1).any():
        raise ValueError(f"`{name}` must hold one integer >= 1 per sample ({expected}), got {lengths.size} values.")
    return lengths.astype(np.int64)


def _mix(*values: int) -> int:
    out = 0
    for v in values:
        out = (out * 6364136223846793005 + int(v) + 1442695040888963407) % (2**63)
    return out


class _EpochHook:
    """Receives Lightning's per-epoch ``set_epoch`` for a batch sampler (Lightning calls it on
    ``loader.batch_sampler.sampler``, not on batch samplers)."""

    def __init__(self, owner: ReplayBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class ReplayBatchSampler(Sampler[list[int]]):
    """Batch sampler over ``ConcatDataset([finetune, pool])``: each batch of ``batch_sampler`` (fine-tuning indices)
    followed by the pool indices (offset by ``num_finetune``) that ``policy`` draws for it.

    How many: ``budget`` (:class:`~lightning_ft.rehearsal.ReplayBudget`) gives the count of the fit's ``n``-th batch,
    ``n = epoch * epoch_batches + index``, from the index alone; with ``budget.kind == "tokens"`` a batch rehearses
    pool samples until their tokens reach ``budget.tokens(its fine-tuning tokens)``, the sample that crosses the target
    kept with the probability of the part of it the target still covers, so every batch (a batch of 1 too) rehearses
    the target in expectation. Which: ``policy`` draws them with a generator seeded by (``seed``, epoch, index, rank),
    so the ranks rehearse different samples, and a batch is drawn again identically from the policy's state (a
    loss-priority cycle from the count of the fit's earlier draws). Feeding every rank the same all-gathered feedback
    (:class:`~lightning_ft.rehearsal.RehearsalFeedback`) keeps the policy, hence the whole sampler state, identical
    across ranks.

    ``state_dict`` holds the epoch, the position in it and the policy's state, so a restored sampler continues from
    the next batch of the interrupted epoch (``batch_sampler`` must give the same batches for the same epoch, as a
    ``DistributedSampler``'s seeded shuffle does; Lightning's ``set_epoch`` reaches it through this sampler):
    ``state_dict(consumed=k)`` when a data loader has drawn batches ahead of the training (worker prefetch), so those
    are drawn again with the policy state they were drawn with.

    Args:
        batch_sampler: the fine-tuning batches (lists of indices into the fine-tuning dataset), e.g.
            ``BatchSampler(DistributedSampler(finetune, seed=0), batch_size, drop_last)``; its ``batch_size`` is the
            one of ``budget``.
        num_finetune: size of the fine-tuning dataset (the first part of the concatenation).
        policy: what to rehearse (:func:`~lightning_ft.rehearsal.make_policy`).
        budget: how much to rehearse.
        epoch_batches: the batches of an epoch the fit consumes (None: ``len(batch_sampler)``; fewer under the
            Trainer's ``limit_train_batches``).
        pool_lengths, finetune_lengths: tokens of every pool / fine-tuning sample (``budget.kind == "tokens"``).
        seed: seed of the draws.
        rank, world_size: this process's place in data parallelism (None: a ``DistributedSampler``'s inside
            ``batch_sampler``, else 0 and 1).
    """

    def __init__(
        self,
        batch_sampler: Iterable[list[int]],
        num_finetune: int,
        policy: ReplayPolicy,
        budget: ReplayBudget,
        epoch_batches: int | None = None,
        pool_lengths: Sequence[int] | Tensor | None = None,
        finetune_lengths: Sequence[int] | Tensor | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        check_int("num_finetune", num_finetune)
        check_int("epoch_batches", epoch_batches, allow_none=True)
        if not isinstance(policy, ReplayPolicy):
            raise ValueError(f"`policy` must be a ReplayPolicy, got {type(policy).__name__}.")
        if not isinstance(budget, ReplayBudget):
            raise ValueError(f"`budget` must be a ReplayBudget, got {type(budget).__name__}.")
        inner = getattr(batch_sampler, "sampler", None)
        if isinstance(inner, DistributedSampler):
            rank = inner.rank if rank is None else rank
            world_size = inner.num_replicas if world_size is None else world_size
        rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
        check_int("world_size", world_size)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"`rank` must be < `world_size` ({world_size}), got {rank}.")
        self.batch_sampler, self.num_finetune = batch_sampler, num_finetune
        self.policy, self.replay_budget = policy, budget
        self.epoch_batches, self.seed, self.rank, self.world_size = epoch_batches, seed, rank, world_size
        self.batch_size = budget.batch_size
        self._pool_lengths = self._finetune_lengths = None
        self._spacing = 0  # tokens: an upper estimate of one rank's draws per batch (a loss-priority cycle's step)
        if budget.kind == "tokens":
            self._pool_lengths = _lengths("pool_lengths", pool_lengths, len(policy))
            self._finetune_lengths = _lengths("finetune_lengths", finetune_lengths, num_finetune)
            self._mean_pool_length = float(self._pool_lengths.mean())
            share = budget.max_share()
            tokens = budget.batch_size * float(self._finetune_lengths.mean()) * share / (1.0 - share)
            self._spacing = math.ceil(tokens / self._mean_pool_length) + 1
        self.epoch = 0
        self._position = 0  # batches of this epoch the current iterator has yielded (the index of its next batch)
        # (batch index, policy draw state) of recent batches: what a checkpoint needs to draw again the batches a
        # loader prefetched but the training has not used yet
        self._history: deque[tuple[int, Any]] = deque(maxlen=_HISTORY)
        self._drawn: dict[int, int] = {}  # this epoch's batch index -> pool samples drawn for it
        self._resume: dict[str, Any] | None = None  # a mid-epoch start from load_state_dict, for the next __iter__
        self._direct = torch.Generator().manual_seed(_mix(seed, _DIRECT, rank))  # draw() outside an iteration
        self._direct_offset = 0
        self.sampler = _EpochHook(self)

    # ------------------------------------------------------------------------------------------------ delegation
    @property
    def strategy(self) -> str:
        return self.policy.strategy

    @property
    def budget(self) -> str:
        """``"samples"`` or ``"tokens"``: what the replay share counts."""
        return self.replay_budget.kind

    @property
    def replay(self) -> int:
        """The rounded count of one batch at the starting share (the default of :meth:`draw`)."""
        return self.replay_budget.replay

    @property
    def alpha(self) -> Tensor | None:
        """mix-cd's per-bin collateral-damage rates (None for the other policies)."""
        return self.policy.alpha if isinstance(self.policy, MixCDPolicy) else None

    @property
    def seen(self) -> Tensor:
        return self.policy.seen

    @property
    def forgot(self) -> Tensor:
        return self.policy.forgot

    @property
    def num_bins(self) -> int:
        return self.policy.num_bins

    @property
    def bin_of(self) -> Tensor:
        return self.policy.bin_of

    @property
    def bin_sizes(self) -> Tensor:
        return self.policy.bin_sizes

    @property
    def hit_rate(self) -> float:
        return self.policy.hit_rate

    def probabilities(self) -> Tensor:
        """The probability of drawing each of the policy's bins at the next step (a copy)."""
        return self.policy.probabilities()

    def update(self, pool_positions: Tensor | np.ndarray, forgot: Tensor | np.ndarray) -> None:
        """:meth:`ReplayPolicy.update`: call it with the same (all-gathered) values on every rank."""
        self.policy.update(pool_positions, forgot)

    def forgotten(self, pool_positions: np.ndarray, correct: np.ndarray) -> np.ndarray:
        """Collateral damage: which rehearsed samples the prior model got right and the current one gets wrong."""
        if pool_positions.size and pool_positions.max() >= len(self.policy):
            raise ValueError(
                f"sample id {int(pool_positions.max()) + self.num_finetune} is past the pool's last id"
                f" ({self.num_finetune + len(self.policy) - 1}): report the ids the data module appends."
            )
        return self.policy.forgotten(pool_positions, correct)

    def replay_share(self, batch: int) -> float:
        """The replay share of the fit's ``batch``-th batch (:meth:`ReplayBudget.share`)."""
        return self.replay_budget.share(batch)

    def expected_replay(self, batches: int) -> float:
        """The expected pool samples of the fit's first ``batches`` batches (:meth:`ReplayBudget.expected`)."""
        return self.replay_budget.expected(batches)

    def replay_count(self, batch: int) -> int:
        """Pool samples in the fit's ``batch``-th batch (``budget="samples"``; :meth:`ReplayBudget.count`)."""
        return self.replay_budget.count(batch)

    @property
    def schedule_batches(self) -> int | None:
        return self.replay_budget.schedule_batches

    def drawn(self, index: int) -> int | None:
        """The pool samples this rank drew for the current epoch's ``index``-th batch (None: not drawn)."""
        return self._drawn.get(index)

    def is_replay(self, indices: Tensor) -> Tensor:
        """Which concatenated-dataset indices come from the pool."""
        return torch.as_tensor(indices) >= self.num_finetune

    # ------------------------------------------------------------------------------------------------ drawing
    def draw(self, count: int | None = None) -> Tensor:
        """Pool positions of ``count`` (default: :attr:`replay`) draws outside an iteration, from a stream of their
        own (tests, custom loops): every rank advances a loss-priority cycle by ``world_size * count``."""
        count = self.replay if count is None else count
        positions = self.policy.sample(count, self._direct, self._direct_offset + self.rank * count)
        self._direct_offset += self.world_size * count
        return torch.from_numpy(positions)

    def _fit_batches_before_epoch(self) -> int:
        return self.epoch * (self.epoch_batches or len(self))

    def _priority_offset(self, batch: int, count: int) -> int:
        """Where this rank's draws for the fit's ``batch``-th batch start in a loss-priority cycle: after every
        rank's draws of the fit's earlier batches (tokens: after an upper estimate of them)."""
        if self.replay_budget.kind == "samples":
            return self.world_size * self.replay_budget.cumulative(batch) + self.rank * count
        return (batch * self.world_size + self.rank) * self._spacing

    def _replay(self, batch: int, index: int, finetune: Sequence[int], draw_state: Any) -> np.ndarray:
        """This rank's pool positions for the fit's ``batch``-th batch (the epoch's ``index``-th)."""
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index, self.rank))
        if self._finetune_lengths is None:
            count = self.replay_budget.count(batch)
            return self.policy.sample(count, generator, self._priority_offset(batch, count), draw_state)
        assert self._pool_lengths is not None
        target = self.replay_budget.tokens(float(self._finetune_lengths[np.asarray(finetune)].sum()), batch)
        offset, mean = self._priority_offset(batch, 0), self._mean_pool_length
        taken: list[np.ndarray] = []
        tokens = 0.0
        while tokens < target:
            chunk = self.policy.sample(int((target - tokens) / mean) + 1, generator, offset, draw_state)
            offset += chunk.size
            lengths = self._pool_lengths[chunk]
            ends = tokens + np.cumsum(lengths)
            whole = int((ends <= target).sum())  # the samples wholly inside the target
            if whole < chunk.size:  # the next crosses it: kept with the probability of the part the target covers
                covered = (target - (ends[whole] - lengths[whole])) / lengths[whole]
                keep = float(torch.rand(1, generator=generator)) < covered
                taken.append(chunk[: whole + keep])
                break
            taken.append(chunk)
            tokens = float(ends[-1])
        return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (through :attr:`sampler`); it reaches the wrapped batch
        sampler's sampler too. A new epoch starts at its first batch; the same epoch again (a fit resumed mid-epoch)
        keeps a restored position."""
        if int(epoch) != self.epoch:
            self._resume = None
            self._position = 0
            self._history.clear()
        self.epoch = int(epoch)
        inner = getattr(self.batch_sampler, "sampler", None)
        if callable(getattr(inner, "set_epoch", None)):
            inner.set_epoch(self.epoch)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None  # a resumed position serves one iterator; the next starts at 0
        first = 0 if resume is None else int(resume["position"])
        pending = [] if resume is None or resume.get("pending") is None else list(resume["pending"])
        self._history.clear()
        self._drawn.clear()
        self._position = first
        start = self._fit_batches_before_epoch()
        for index, finetune in enumerate(self.batch_sampler):
            if index < first:  # a resumed epoch: the batches trained before the checkpoint
                continue
            # the batches a loader had prefetched past the checkpoint are drawn with the state they were drawn with
            draw_state = pending[index - first] if index - first < len(pending) else self.policy.draw_state()
            self._history.append((index, draw_state))
            positions = self._replay(start + index, index, finetune, draw_state)
            self._drawn[index] = positions.size
            self._position = index + 1
            yield [*finetune, *(positions + self.num_finetune).tolist()]

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's state: epoch, position in it, the policy's state.

        Args:
            consumed: batches of the current epoch the training has used; the batches drawn after them (a loader's
                prefetch) are drawn again, identically, by a sampler restored from this state. None: every batch
                drawn so far (no prefetch; a loader with ``num_workers=0``).
        """
        state: dict[str, Any] = {"epoch": self.epoch, "position": self._position, "pending": None}
        state["policy"] = self.policy.state_dict()
        if self._resume is not None:  # restored, not iterated yet: the restored position
            return {**state, "position": self._resume["position"], "pending": self._resume.get("pending")}
        position = self._position if consumed is None else max(0, min(int(consumed), self._position))
        if position < self._position:
            pending = [entry for entry in self._history if entry[0] >= position]
            if not pending or pending[0][0] != position:
                raise RuntimeError(
                    f"the data loader drew {self._position - position} batches ahead of the training, more than the"
                    f" {_HISTORY} the sampler can draw again after a resume: use fewer workers or a smaller"
                    " prefetch_factor."
                )
            states = [None if s is None else torch.from_numpy(np.array(s)) for _, s in pending]
            state.update(position=position, pending=states)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next iterator continues the saved epoch from its position (a state saved
        at the end of an epoch continues with the next epoch). States of the previous sampler version (a shared
        random stream) restore the rates and counts; their stream position is not used."""
        policy = state.get("policy")
        pending = state.get("pending")
        if policy is None:  # the previous version: rates and counts at the top, pending draws under "replay"
            policy = {key: state[key] for key in ("seen", "forgot", "alpha") if key in state}
            if not isinstance(self.policy, MixCDPolicy):
                policy = {"seen": policy["seen"][:1], "forgot": policy["forgot"][:1]}
            replay = state.get("replay")
            pending = None if replay is None else replay.get("pi")
        self.policy.load_state_dict(policy)
        epoch, position = int(state["epoch"]), int(state.get("position", 0))
        if position >= (self.epoch_batches or len(self)):  # the saved epoch was finished: the next one
            epoch, position, pending = epoch + 1, 0, None
        if pending is not None:
            pending = [None if s is None else _host(s).astype(np.float32) for s in pending]
        self._history.clear()
        self.set_epoch(epoch)
        self._position = position
        self._resume = {"position": position, "pending": pending} if position or pending else None


class CollateralDamageSampler(ReplayBatchSampler):
    """A :class:`ReplayBatchSampler` built from the pool's reference statistics and the fine-tuning set's size:
    each batch holds ``batch_size`` fine-tuning indices (this rank's shard of a ``DistributedSampler``, reshuffled
    every epoch by ``seed + epoch``, padded to equal shards so every rank runs the same number of steps) followed by
    the pool indices (offset by ``num_finetune``) that the ``strategy``'s policy draws.

    Strategies (:func:`~lightning_ft.rehearsal.make_policy`): ``"mixcd"`` (:class:`~lightning_ft.rehearsal.MixCDPolicy`:
    bins of reference loss, optionally x ``pool_groups``, drawn by their collateral-damage rates), ``"random"``,
    ``"random_prior_correct"`` (:class:`~lightning_ft.rehearsal.RandomPolicy`), ``"loss_priority"``
    (:class:`~lightning_ft.rehearsal.LossPriorityPolicy`). The replay amount follows
    :class:`~lightning_ft.rehearsal.ReplayBudget` (a ratio with fractional counts carried over, a fixed count, a
    schedule, or a ratio of tokens).

    Under DDP every rank builds the sampler with its ``rank`` and ``world_size`` (set
    ``Trainer(use_distributed_sampler=False)``); :class:`~lightning_ft.rehearsal.RehearsalDataModule` does all this.

    Args:
        num_finetune: size of the fine-tuning dataset (the first part of the concatenation).
        pool_loss, pool_correct: the starting model's loss and correctness on every pool sample, in pool order.
        batch_size: fine-tuning samples per batch (per rank).
        replay_ratio, replay_per_step, replay_schedule, schedule_batches, budget: see
            :class:`~lightning_ft.rehearsal.ReplayBudget`.
        epoch_batches: the batches of an epoch the fit consumes (None: ``len(self)``).
        pool_lengths, finetune_lengths: tokens of every pool / fine-tuning sample (``budget="tokens"``).
        strategy: one of :data:`STRATEGIES`.
        num_bins, pool_groups, exclude_prior_incorrect, epsilon, alpha_min, alpha_init, beta: see
            :class:`~lightning_ft.rehearsal.MixCDPolicy` (checked for every strategy).
        shuffle: shuffle the fine-tuning indices every epoch.
        drop_last: drop this rank's last incomplete fine-tuning batch.
        seed: seed of the shuffles and draws.
        rank, world_size: this process's place in data parallelism.

    Example::

        sampler = CollateralDamageSampler(len(finetune), stats.loss, stats.correct, batch_size=32, replay_ratio=0.1)
        loader = DataLoader(ConcatDataset([finetune, pool]), batch_sampler=sampler)

    Reference: Bai, Yeh, Hsieh, Taly, "An Efficient Rehearsal Scheme for Catastrophic Forgetting Mitigation during
    Multi-stage Fine-tuning", Findings of NAACL 2025, arXiv:2402.08096.
    """

    def __init__(
        self,
        num_finetune: int,
        pool_loss: Sequence[float] | Tensor,
        pool_correct: Sequence[bool] | Tensor,
        batch_size: int,
        replay_ratio: float = 0.25,
        replay_per_step: int | None = None,
        replay_schedule: Sequence[Sequence[float]] | None = None,
        schedule_batches: int | None = None,
        epoch_batches: int | None = None,
        budget: Budget = "samples",
        pool_lengths: Sequence[int] | Tensor | None = None,
        finetune_lengths: Sequence[int] | Tensor | None = None,
        strategy: Strategy = "mixcd",
        num_bins: int = 10,
        pool_groups: Sequence[int] | Tensor | None = None,
        exclude_prior_incorrect: bool = True,
        epsilon: float = 0.05,
        alpha_min: float = 0.01,
        alpha_init: float = 1.0,
        beta: float = 0.1,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_int("num_finetune", num_finetune)
        check_int("world_size", world_size)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"`rank` must be < `world_size` ({world_size}), got {rank}.")
        amount = ReplayBudget(batch_size, replay_ratio, replay_per_step, replay_schedule, schedule_batches, budget)
        policy = make_policy(
            strategy,
            pool_loss,
            pool_correct,
            num_bins=num_bins,
            pool_groups=pool_groups,
            exclude_prior_incorrect=exclude_prior_incorrect,
            epsilon=epsilon,
            alpha_min=alpha_min,
            alpha_init=alpha_init,
            beta=beta,
        )
        shard = DistributedSampler(
            range(num_finetune), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        super().__init__(
            BatchSampler(shard, batch_size, drop_last),
            num_finetune,
            policy,
            amount,
            epoch_batches=epoch_batches,
            pool_lengths=pool_lengths,
            finetune_lengths=finetune_lengths,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self.shuffle, self.drop_last = shuffle, drop_last

    @staticmethod
    def num_batches(num_finetune: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per epoch on every rank (the shards are padded to equal size)."""
        shard = math.ceil(num_finetune / world_size)
        return shard // batch_size if drop_last else math.ceil(shard / batch_size)
