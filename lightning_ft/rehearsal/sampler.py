"""Collateral-damage (mix-cd) rehearsal: a batch sampler that mixes pool samples into every fine-tuning batch.

Bai et al. (NAACL Findings 2025) rehearse the pretraining samples that are *collateral damage*: right under the prior
model, wrong under the model being fine-tuned. Finding them directly needs extra inference, so mix-cd bins the pool
by the prior model's loss and estimates each bin's collateral-damage rate from the rehearsed samples' own training
forward passes (fed back through :meth:`CollateralDamageSampler.update`), then draws more from the bins that are
being forgotten. The estimator, the allocation and the exploration below are our reconstruction (the method section
and code were not available); see the method card.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_ft._internal.validation import check_int

__all__ = ["STRATEGIES", "CollateralDamageSampler"]

Strategy = Literal["mixcd", "random", "random_prior_correct", "loss_priority"]
Budget = Literal["samples", "tokens"]
STRATEGIES: tuple[str, ...] = ("mixcd", "random", "random_prior_correct", "loss_priority")

# batches a data loader may draw ahead of the training (its workers' prefetch) that a checkpoint can still reproduce
_HISTORY = 64


def _unit_interval(name: str, value: float, closed_right: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"`{name}` must be in {bound}, got {value!r}.")


def _lengths(name: str, values: Sequence[int] | Tensor | None, expected: int) -> np.ndarray:
    if values is None:
        raise ValueError(f"`budget='tokens'` needs `{name}`: the number of tokens of every sample.")
    lengths = _host(values).ravel()
    if lengths.size != expected or not np.issubdtype(lengths.dtype, np.integer) or (lengths < 1).any():
        raise ValueError(f"`{name}` must hold one integer >= 1 per sample ({expected}), got {lengths.size} values.")
    return lengths.astype(np.int64)


def _host(values: Tensor | np.ndarray | Sequence[Any]) -> np.ndarray:
    """A NumPy array of ``values`` (a tensor is moved to the host first)."""
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class _EpochHook:
    """Receives Lightning's per-epoch ``set_epoch`` for a batch sampler."""

    def __init__(self, owner: CollateralDamageSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class CollateralDamageSampler(Sampler[list[int]]):
    """Batch sampler over ``ConcatDataset([finetune, pool])``: each batch holds ``batch_size`` fine-tuning indices
    (this rank's shard) followed by ``replay`` pool indices (offset by ``num_finetune``).

    Strategies:

    * ``"mixcd"``: the pool's prior-correct samples are split into ``num_bins`` quantile bins of reference loss
      (prior-incorrect samples can never be collateral damage: excluded, or their own bin). Bin ``k`` is drawn with
      probability ``pi_k = (1 - epsilon) * |B_k| max(alpha_k, alpha_min) / Z + epsilon * |B_k| / M`` and a sample
      uniformly (with replacement) inside it; ``alpha_k``, the bin's collateral-damage rate, starts at
      ``alpha_init`` (so early draws are uniform) and follows a count-weighted exponential moving average of the
      forgotten share of the bin's rehearsed samples reported to :meth:`update` (``beta`` per observation: a bin
      seen ``n`` times at share ``rate`` moves to ``(1 - beta)^n alpha + (1 - (1 - beta)^n) rate``). With
      ``pool_groups`` (e.g. the pool's class labels) every group is binned on its own, giving up to
      ``groups x num_bins`` bins (reference loss x class): a class the fine-tuning damages more is then found and
      rehearsed more.
    * ``"random"``: uniform over the pool. ``"random_prior_correct"``: uniform over prior-correct samples.
      ``"loss_priority"``: the highest reference losses first, cycling through the pool in that order.

    ``replay_schedule`` changes the replay share during training: piecewise-linear points ``(progress, ratio)`` with
    progress in [0, 1] the share of ``schedule_batches`` drawn so far (``epoch * epoch_batches + batch``), e.g.
    ``[(0.0, 0.25), (1.0, 0.05)]`` decays the share from 25% to 5% of each batch. With a ratio (constant or
    scheduled) the fractional counts carry over: the first ``n`` batches of the fit rehearse ``round(E(n))`` pool
    samples, ``E(n)`` the sum of the batches' ``batch_size * share / (1 - share)`` (:meth:`replay_count`), so small
    batches keep their share (batch 4 at 10%: 4 pool samples every 9 batches, not none). The count of a
    batch follows from its index alone, so every rank, and a resumed run, draws the same count.

    Under DDP every rank builds the sampler with its ``rank`` and ``world_size`` (set
    ``Trainer(use_distributed_sampler=False)``): the fine-tuning indices are shuffled identically on every rank
    (``seed + epoch``), padded by repeating the first ones to a multiple of ``world_size`` (as ``DistributedSampler``
    does, so every rank runs the same number of steps) and sharded ``rank::world_size``; the replay stream is shared
    (each rank keeps its slice of every step's draws), and feeding every rank the same all-gathered updates keeps
    ``alpha`` (hence ``pi``) and the whole sampler state identical across ranks. ``state_dict`` holds the epoch, the
    position in it, the rates, the counts and the generator state, so a restored sampler continues the same stream,
    from the next batch of the interrupted epoch when saved mid-epoch: ``state_dict(consumed=k)`` when a data loader
    has drawn batches ahead of the training (worker prefetch), so that the drawn but untrained ones are drawn again
    (from the generator state and the draw probabilities they were drawn with) on every rank.

    Args:
        num_finetune: size of the fine-tuning dataset (the first part of the concatenation).
        pool_loss: reference loss of every pool sample, in pool order.
        pool_correct: whether the prior model gets each pool sample right, in pool order.
        batch_size: fine-tuning samples per batch (per rank).
        replay_ratio: share of each batch taken from the pool, ``r / (b + r)``, in [0, 1).
        replay_per_step: absolute number of pool samples per batch (overrides ``replay_ratio``).
        replay_schedule: ``(progress, ratio)`` points of a piecewise-linear replay share (overrides ``replay_ratio``;
            not with ``replay_per_step``); progress in [0, 1] and non-decreasing, ratios in [0, 1); the share is held
            constant before the first point and after the last.
        schedule_batches: the number of batches the schedule's progress runs over (the whole fit:
            :class:`RehearsalDataModule` sets it from the Trainer's ``max_epochs`` / ``max_steps``).
        epoch_batches: the batches of an epoch the fit consumes, for the schedule's progress (None: ``len(self)``;
            fewer under the Trainer's ``limit_train_batches``, which :class:`RehearsalDataModule` passes on).
        budget: ``"samples"``: the replay share counts samples; ``"tokens"`` (causal LMs with sequences of different
            lengths): it counts tokens, i.e. each batch rehearses pool samples until their tokens reach
            ``ratio / (1 - ratio)`` times the tokens of the batch's fine-tuning samples (the sample that crosses the
            budget is kept, so a batch overshoots by less than one sample). Needs ``pool_lengths`` and
            ``finetune_lengths``, and a ratio (``replay_ratio`` or ``replay_schedule``), not ``replay_per_step``.
        pool_lengths, finetune_lengths: tokens of every pool / fine-tuning sample (``budget="tokens"``).
        strategy: one of :data:`STRATEGIES`.
        num_bins: quantile bins of reference loss (mix-cd), per group when ``pool_groups`` is given.
        pool_groups: an integer group of every pool sample (e.g. its class label), in pool order; None: one group.
        exclude_prior_incorrect: never rehearse prior-incorrect samples (mix-cd); False gives them their own bin.
        epsilon: share of uniform (by bin size) exploration in ``pi``, in [0, 1].
        alpha_min: floor of the rates in ``pi`` (no bin starves), >= 0.
        alpha_init: starting rate of every bin, in [0, 1].
        beta: EMA weight of one observation, in (0, 1] (count-weighted: see :meth:`update`).
        shuffle: shuffle the fine-tuning indices every epoch.
        drop_last: drop this rank's last incomplete fine-tuning batch.
        seed: seed of the shuffles and draws.
        rank, world_size: this process's place in data parallelism.

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
        check_int("batch_size", batch_size)
        check_int("num_bins", num_bins)
        check_int("replay_per_step", replay_per_step, minimum=0, allow_none=True)
        check_int("world_size", world_size)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"`rank` must be < `world_size` ({world_size}), got {rank}.")
        if strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
        _unit_interval("replay_ratio", replay_ratio)
        schedule = self._check_schedule(replay_schedule, replay_per_step, schedule_batches)
        self._check_budget(budget, replay_per_step)
        _unit_interval("epsilon", epsilon, closed_right=True)
        _unit_interval("alpha_init", alpha_init, closed_right=True)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"`beta` must be in (0, 1], got {beta!r}.")
        if not alpha_min >= 0.0:
            raise ValueError(f"`alpha_min` must be >= 0, got {alpha_min!r}.")
        loss = torch.as_tensor(pool_loss, dtype=torch.float32).flatten()
        correct = torch.as_tensor(pool_correct).bool().flatten()
        if loss.numel() == 0:
            raise ValueError("the rehearsal pool is empty: pass at least one pool sample (or use no sampler).")
        if correct.shape != loss.shape:
            raise ValueError(f"`pool_correct` has {correct.numel()} entries for {loss.numel()} pool losses.")
        if not bool(torch.isfinite(loss).all()):
            raise ValueError("`pool_loss` has NaN or infinite values; drop those samples from the pool.")
        groups = None
        if pool_groups is not None:
            groups = torch.as_tensor(pool_groups).flatten()
            if groups.shape != loss.shape or groups.is_floating_point() or groups.dtype == torch.bool:
                raise ValueError(
                    f"`pool_groups` must hold one integer group per pool sample ({loss.numel()}), got"
                    f" {groups.numel()} values of type {groups.dtype}."
                )
        self.num_finetune, self.batch_size, self.strategy = num_finetune, batch_size, strategy
        check_int("epoch_batches", epoch_batches, allow_none=True)
        self.replay_schedule, self.schedule_batches, self.epoch_batches = schedule, schedule_batches, epoch_batches
        self._per_step = replay_per_step
        self._cumulative: np.ndarray | None = None  # expected pool samples of the schedule's first n batches
        # the count of one batch, rounded (the default of draw()); with a ratio, replay_count(b) carries the fractions
        if replay_per_step is not None:
            self.replay = replay_per_step
        else:
            self.replay = self._count(schedule[0][1] if schedule else replay_ratio)
        self.epsilon, self.alpha_min, self.beta = float(epsilon), float(alpha_min), float(beta)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.pool_loss, self.pool_correct = loss, correct
        self.pool_groups = groups
        self.budget, self.replay_ratio = budget, float(replay_ratio)
        self._pool_lengths = self._finetune_lengths = None
        if budget == "tokens":
            self._pool_lengths = _lengths("pool_lengths", pool_lengths, loss.numel())
            self._finetune_lengths = _lengths("finetune_lengths", finetune_lengths, num_finetune)
        self._build_bins(num_bins, exclude_prior_incorrect)
        self.alpha = torch.full((self.num_bins,), float(alpha_init))
        self.seen = torch.zeros(self.num_bins, dtype=torch.long)  # rehearsed samples reported per bin
        self.forgot = torch.zeros(self.num_bins, dtype=torch.long)  # ... of which forgotten
        self._probabilities: Tensor | None = None  # pi, cached until the next update
        self.epoch = 0
        self._position = 0  # batches of this epoch the current iterator has yielded (the index of its next batch)
        # (batch index, generator state, cursor, pi) before each recent draw: what a checkpoint needs to draw again
        # the batches a loader prefetched but the training has not used yet
        self._history: deque[tuple[int, Tensor, int, Tensor | None]] = deque(maxlen=_HISTORY)
        self._resume: dict[str, Any] | None = None  # a mid-epoch start from load_state_dict, for the next __iter__
        self._cursor = 0  # loss_priority position
        # one stream on every rank: each step draws world_size * replay samples and a rank keeps its own slice, so the
        # ranks rehearse different samples while their sampler states stay identical
        self._generator = torch.Generator().manual_seed(self._mix(seed, 1_000_003))
        # Lightning calls set_epoch on ``loader.batch_sampler.sampler`` at every epoch start (not on batch samplers):
        # this hook forwards it, so the shuffle and the replay schedule advance with or without RehearsalFeedback
        self.sampler = _EpochHook(self)

    # the per-step bookkeeping runs on NumPy views of the state tensors (a few microseconds per operation, against tens
    # for small torch ops); taken afresh at each use, so copies, pickles and reassigned tensors never go stale
    @property
    def _alpha(self) -> np.ndarray:
        return self.alpha.numpy()

    @property
    def _seen(self) -> np.ndarray:
        return self.seen.numpy()

    @property
    def _forgot(self) -> np.ndarray:
        return self.forgot.numpy()

    # ----------------------------------------------------------------------------------------------------- budget
    @staticmethod
    def _check_schedule(
        schedule: Sequence[Sequence[float]] | None, replay_per_step: int | None, schedule_batches: int | None
    ) -> list[tuple[float, float]] | None:
        if schedule is None:
            return None
        if replay_per_step is not None:
            raise ValueError("pass either `replay_per_step` or `replay_schedule`, not both.")
        check_int("schedule_batches", schedule_batches)
        try:
            points = [(float(p), float(r)) for p, r in schedule]
        except (TypeError, ValueError):
            raise ValueError(
                f"`replay_schedule` must be a list of (progress, ratio) pairs, e.g. [[0.0, 0.25], [1.0, 0.05]]; got"
                f" {schedule!r}."
            ) from None
        if not points:
            raise ValueError("`replay_schedule` is empty: give at least one (progress, ratio) point, or None.")
        for progress, ratio in points:
            _unit_interval("replay_schedule progress", progress, closed_right=True)
            _unit_interval("replay_schedule ratio", ratio)
        if any(b[0] < a[0] for a, b in itertools.pairwise(points)):
            raise ValueError(f"`replay_schedule` progress must be non-decreasing, got {[p for p, _ in points]}.")
        return points

    @staticmethod
    def _check_budget(budget: str, replay_per_step: int | None) -> None:
        if budget not in ("samples", "tokens"):
            raise ValueError(f"`budget` must be 'samples' or 'tokens', got {budget!r}.")
        if budget == "tokens" and replay_per_step is not None:
            raise ValueError(
                "`budget='tokens'` sets the replay by a ratio of tokens: pass `replay_ratio` or `replay_schedule`,"
                " not `replay_per_step`."
            )

    def _count(self, ratio: float) -> int:
        return round(self._expected(ratio))

    def _expected(self, ratio: float) -> float:
        """The expected pool samples next to ``batch_size`` fine-tuning ones at replay share ``ratio``."""
        return self.batch_size * ratio / (1.0 - ratio)

    def replay_share(self, batch: int) -> float:
        """The replay share ``r / (b + r)`` of the fit's ``batch``-th batch (``epoch * epoch_batches + index``)."""
        if self.replay_schedule is None:
            return self.replay_ratio
        assert self.schedule_batches is not None
        progress = min(batch / self.schedule_batches, 1.0)
        points = self.replay_schedule
        i = bisect.bisect_right([p for p, _ in points], progress)
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        (p0, r0), (p1, r1) = points[i - 1], points[i]
        return r0 + (r1 - r0) * (progress - p0) / (p1 - p0)

    def _shares(self) -> np.ndarray:
        """:meth:`replay_share` of every batch of the schedule, vectorised (the same arithmetic)."""
        assert self.replay_schedule is not None and self.schedule_batches is not None
        progress = np.minimum(np.arange(self.schedule_batches, dtype=np.float64) / self.schedule_batches, 1.0)
        ps = np.array([p for p, _ in self.replay_schedule])
        rs = np.array([r for _, r in self.replay_schedule])
        if len(ps) == 1:
            return np.full(progress.shape, rs[0])
        i = np.searchsorted(ps, progress, side="right")  # bisect_right
        inner = np.clip(i, 1, len(ps) - 1)
        p0, p1, r0, r1 = ps[inner - 1], ps[inner], rs[inner - 1], rs[inner]
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = r0 + (r1 - r0) * (progress - p0) / (p1 - p0)
        return np.where(i == 0, rs[0], np.where(i == len(ps), rs[-1], shares))

    def expected_replay(self, batches: int) -> float:
        """The expected pool samples of the fit's first ``batches`` batches (a ratio: the sum of every batch's
        ``batch_size * share / (1 - share)``; ``replay_per_step``: ``batches * replay_per_step``)."""
        if self._per_step is not None:
            return float(batches * self._per_step)
        if self.replay_schedule is None:
            return batches * self._expected(self.replay_ratio)
        assert self.schedule_batches is not None
        if self._cumulative is None:  # the schedule's running sum, once: the share is constant past its end
            self._cumulative = np.concatenate([[0.0], np.cumsum(self._expected(self._shares()))])
        past = max(batches - self.schedule_batches, 0)
        cumulative = self._cumulative[min(batches, self.schedule_batches)]
        return float(cumulative + past * self._expected(self.replay_share(self.schedule_batches)))

    def replay_count(self, batch: int) -> int:
        """Pool samples in the fit's ``batch``-th batch (``budget="samples"``).

        ``replay_per_step``: that number. A ratio (``replay_ratio`` or ``replay_schedule``): the fractional expected
        counts carry over from batch to batch, ``round(E(batch + 1)) - round(E(batch))`` with ``E(n)`` the expected
        pool samples of the first ``n`` batches (:meth:`expected_replay`, rounded half up), so the fit's first ``n``
        batches rehearse ``round(E(n))`` samples (within half a sample of the ratio, e.g. 4 pool samples every 9
        batches of 4 at ratio 0.1) and the count depends on the batch index alone (every rank, and a resumed fit,
        draws the same counts).
        """
        if self._per_step is not None:
            return self._per_step
        return math.floor(self.expected_replay(batch + 1) + 0.5) - math.floor(self.expected_replay(batch) + 0.5)

    # ----------------------------------------------------------------------------------------------------- bins
    def _build_bins(self, num_bins: int, exclude_prior_incorrect: bool) -> None:
        pool = torch.arange(self.pool_loss.numel())
        eligible = pool[self.pool_correct] if self.strategy != "random" else pool
        if self.strategy == "mixcd":
            if eligible.numel() == 0 and exclude_prior_incorrect:
                raise ValueError("no pool sample is correct under the prior model: mix-cd has nothing to rehearse.")
            bins = torch.zeros(self.pool_loss.numel(), dtype=torch.long)
            k = 0
            groups = self.pool_groups[eligible] if self.pool_groups is not None else torch.zeros_like(eligible)
            for group in torch.unique(groups):  # sorted: the same bins on every rank
                members_g = eligible[groups == group]
                k_g = min(num_bins, members_g.numel())
                edges = torch.quantile(self.pool_loss[members_g], torch.linspace(0, 1, k_g + 1)[1:-1])
                bins[members_g] = k + torch.bucketize(self.pool_loss[members_g], edges, right=True)
                k += k_g
            k = max(k, 1)
            members = [eligible]
            if not exclude_prior_incorrect and bool((~self.pool_correct).any()):
                bins[~self.pool_correct] = k
                k += 1
                members.append(pool[~self.pool_correct])
            used = torch.cat(members)
            self.num_bins = k
        else:
            if self.strategy == "random_prior_correct" and eligible.numel() == 0:
                raise ValueError("no pool sample is correct under the prior model: nothing to rehearse.")
            used = pool if self.strategy in ("random", "loss_priority") else eligible
            bins = torch.zeros(self.pool_loss.numel(), dtype=torch.long)
            self.num_bins = 1
        self.bin_of = bins  # bin of every pool position (meaningful for the positions in `used`)
        order = used[torch.argsort(bins[used], stable=True)]
        self.bin_sizes = torch.bincount(bins[used], minlength=self.num_bins)
        self._bin_of = bins.numpy()
        self._members = order.numpy()  # pool positions grouped by bin
        self._sizes = self.bin_sizes.numpy()
        self._sizes_f = self._sizes.astype(np.float32)
        self._starts = np.cumsum(self._sizes) - self._sizes
        self._priority = torch.argsort(self.pool_loss, descending=True, stable=True).numpy()
        self._pool_correct = self.pool_correct.numpy()

    def probabilities(self) -> Tensor:
        """``pi``: the probability of drawing each bin at the next step (a copy)."""
        return self._pi().clone()

    def _pi(self) -> Tensor:
        # cached until the next update() or load_state_dict(): change the rates through those, not in place
        if self._probabilities is None:
            sizes = self._sizes_f
            uniform = sizes / sizes.sum()
            if self.strategy != "mixcd":
                pi = uniform
            else:
                weighted = sizes * np.maximum(self._alpha, np.float32(self.alpha_min))
                total = weighted.sum()
                greedy = weighted / total if total > 0 else uniform
                pi = np.float32(1.0 - self.epsilon) * greedy + np.float32(self.epsilon) * uniform
            self._probabilities = torch.from_numpy(pi)
        return self._probabilities

    def draw(self, count: int | None = None) -> Tensor:
        """Pool positions of this rank's next ``count`` (default: ``replay``) rehearsal samples.

        Every rank advances the same stream by ``world_size * count`` draws and keeps its slice.
        """
        return torch.from_numpy(self._draw(self.replay if count is None else count))

    def _next(self, total: int) -> np.ndarray:
        """The shared stream's next ``total`` pool positions."""
        if self.strategy == "loss_priority":
            idx = (self._cursor + np.arange(total)) % self._priority.size
            self._cursor = int((self._cursor + total) % self._priority.size)
            return self._priority[idx]
        bins = torch.multinomial(self._pi(), total, replacement=True, generator=self._generator).numpy()
        uniform = torch.rand(total, generator=self._generator).numpy()
        offsets = np.minimum((uniform * self._sizes_f[bins]).astype(np.int64), self._sizes[bins] - 1)
        return self._members[self._starts[bins] + offsets]

    def _draw(self, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        return self._next(count * self.world_size)[self.rank * count : (self.rank + 1) * count]

    def _draw_tokens(self, budgets: np.ndarray) -> np.ndarray:
        """This rank's pool positions for token budgets ``budgets`` (one per rank).

        Every rank fills every rank's budget in rank order from the shared stream (it knows all ranks' fine-tuning
        batches), so the stream, and the sampler state, stay identical across ranks; chunks sized by the mean pool
        length keep the draws vectorised.
        """
        assert self._pool_lengths is not None
        mean = max(float(self._pool_lengths.mean()), 1.0)
        mine = np.zeros(0, dtype=np.int64)
        for rank, budget in enumerate(budgets.tolist()):
            taken: list[np.ndarray] = []
            tokens = 0
            while tokens < budget:
                chunk = self._next(int((budget - tokens) / mean) + 1)
                before = tokens + np.cumsum(self._pool_lengths[chunk]) - self._pool_lengths[chunk]
                keep = int((before < budget).sum())  # up to and with the sample that crosses the budget
                if self.strategy == "loss_priority":  # hand the unused positions back to the cycle
                    self._cursor = int((self._cursor - (chunk.size - keep)) % self._priority.size)
                taken.append(chunk[:keep])
                tokens = int(before[keep - 1] + self._pool_lengths[chunk[keep - 1]])
            if rank == self.rank and taken:
                mine = np.concatenate(taken)
        return mine

    # ------------------------------------------------------------------------------------------------ feedback
    def update(self, pool_positions: Tensor | np.ndarray, forgot: Tensor | np.ndarray) -> None:
        """Record which rehearsed pool samples were forgotten (prior-correct and now wrong) in the training pass.

        Call it with the same (all-gathered) values on every rank. Bins without an observation keep their rate. A bin
        observed ``n`` times with forgotten share ``rate`` moves by a count-weighted EMA step,
        ``alpha <- (1 - beta)^n * alpha + (1 - (1 - beta)^n) * rate``: the same as ``n`` single-sample updates with
        that share each (and, averaged over the order of the outcomes, as ``n`` single-sample updates of the outcomes
        themselves), so splitting the same observations into more steps or over more ranks (world size, replay count)
        changes the rates only through the order of the outcomes, and not at all where a bin's outcomes agree;
        ``beta`` is the weight of one observation.
        """
        positions = _host(pool_positions).astype(np.int64, copy=False).ravel()
        flags = _host(forgot).astype(bool, copy=False).ravel()
        if positions.shape != flags.shape:
            raise ValueError(f"{positions.size} pool positions but {flags.size} forgot flags.")
        if positions.size == 0:
            return
        if positions.min() < 0 or positions.max() >= self._bin_of.size:
            raise ValueError(f"pool positions must be in [0, {self._bin_of.size}).")
        bins = self._bin_of[positions]
        seen = np.bincount(bins, minlength=self.num_bins)
        hits = np.bincount(bins[flags], minlength=self.num_bins)
        total_seen, total_forgot, alpha = self._seen, self._forgot, self._alpha  # views: updated in place
        total_seen += seen
        total_forgot += hits
        observed = seen > 0
        n = seen[observed]
        rate = hits[observed] / n
        # count-weighted: a bin seen n times moves as n single-sample updates with its mean forgotten share would
        keep = (1.0 - self.beta) ** n
        alpha[observed] = (keep * alpha[observed] + (1.0 - keep) * rate).astype(np.float32)
        self._probabilities = None

    def forgotten(self, pool_positions: np.ndarray, correct: np.ndarray) -> np.ndarray:
        """Collateral damage: which rehearsed samples the prior model got right and the current one gets wrong."""
        if pool_positions.size and pool_positions.max() >= self._pool_correct.size:
            raise ValueError(
                f"sample id {int(pool_positions.max()) + self.num_finetune} is past the pool's last id"
                f" ({self.num_finetune + self._pool_correct.size - 1}): report the ids the data module appends."
            )
        return self._pool_correct[pool_positions] & ~correct

    @property
    def hit_rate(self) -> float:
        """Share of all reported rehearsal samples that were collateral damage (forgotten)."""
        total = int(self._seen.sum())
        return float(self._forgot.sum()) / total if total else float("nan")

    # ------------------------------------------------------------------------------------------------ sampling
    @staticmethod
    def _mix(*values: int) -> int:
        out = 0
        for v in values:
            out = (out * 6364136223846793005 + int(v) + 1442695040888963407) % (2**63)
        return out

    def _order(self) -> np.ndarray:
        """This epoch's fine-tuning order, padded to a multiple of ``world_size`` (rank ``r`` takes ``r::world``)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self._mix(self.seed, self.epoch))
            order = torch.randperm(self.num_finetune, generator=gen).numpy()
        else:
            order = np.arange(self.num_finetune)
        padding = -self.num_finetune % self.world_size  # equal shards: every rank runs the same number of steps
        if padding:
            order = np.concatenate([order, np.resize(order, padding)])
        return order

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; the fine-tuning order depends on it. A new epoch starts at its
        first batch; the same epoch again (a fit resumed mid-epoch) keeps a restored position."""
        if int(epoch) != self.epoch:
            self._resume = None
            self._position = 0
            self._history.clear()
        self.epoch = int(epoch)

    @staticmethod
    def num_batches(num_finetune: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per epoch on every rank (the shards are padded to equal size)."""
        shard = math.ceil(num_finetune / world_size)
        return shard // batch_size if drop_last else math.ceil(shard / batch_size)

    def __len__(self) -> int:
        return self.num_batches(self.num_finetune, self.batch_size, self.world_size, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None  # a resumed position serves one iterator; the next starts at 0
        first = 0 if resume is None else int(resume["position"])
        replay = None if resume is None else resume.get("replay")
        drawn_again = 0 if replay is None else len(replay["pi"])
        if replay is not None:  # draw the batches a loader had prefetched past the checkpoint again, as they were
            self._generator.set_state(replay["generator"])
            self._cursor = int(replay["cursor"])
        self._history.clear()
        self._position = first
        order, b = self._order(), self.batch_size
        start = self.epoch * (self.epoch_batches or len(self))  # the fit's batches before this epoch
        shard = order[self.rank :: self.world_size]
        # budget="tokens": the fine-tuning tokens of every rank's batches (row r: rank r's shard), to size every
        # rank's replay
        tokens = (
            None if self._finetune_lengths is None else self._finetune_lengths[order.reshape(-1, self.world_size).T]
        )
        for i in range(first, len(self)):
            if i - first < drawn_again:
                self._probabilities = replay["pi"][i - first]  # type: ignore[index]
            pi = None if self.strategy == "loss_priority" else self._pi()
            self._history.append((i, self._generator.get_state(), self._cursor, pi))
            finetune = shard[i * b : (i + 1) * b]
            if tokens is None:
                replay_positions = self._draw(self.replay_count(start + i))
            else:
                share = self.replay_share(start + i)
                budgets = np.rint(tokens[:, i * b : (i + 1) * b].sum(1) * share / (1.0 - share)).astype(np.int64)
                replay_positions = self._draw_tokens(budgets)
            if i - first < drawn_again:
                self._probabilities = None  # back to the current rates
            self._position = i + 1
            yield np.concatenate([finetune, replay_positions + self.num_finetune]).tolist()

    def is_replay(self, indices: Tensor) -> Tensor:
        """Which concatenated-dataset indices come from the pool."""
        return torch.as_tensor(indices) >= self.num_finetune

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's state: epoch, position in it, rates, counts, generator.

        Args:
            consumed: batches of the current epoch the training has used; the batches drawn after them (a loader's
                prefetch) are drawn again, identically, by a sampler restored from this state. None: every batch
                drawn so far (no prefetch; a loader with ``num_workers=0``).
        """
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "position": self._position,
            "replay": None,
            "alpha": self.alpha.clone(),
            "seen": self.seen.clone(),
            "forgot": self.forgot.clone(),
            "cursor": self._cursor,
            "generator": self._generator.get_state(),
        }
        if self._resume is not None:  # restored, not iterated yet: the restored position
            return {**state, "position": self._resume["position"], "replay": self._resume.get("replay")}
        position = self._position if consumed is None else max(0, min(int(consumed), self._position))
        if position < self._position:
            pending = [entry for entry in self._history if entry[0] >= position]
            if not pending or pending[0][0] != position:
                raise RuntimeError(
                    f"the data loader drew {self._position - position} batches ahead of the training, more than the"
                    f" {_HISTORY} the sampler can draw again after a resume: use fewer workers or a smaller"
                    " prefetch_factor."
                )
            _, generator, cursor, _ = pending[0]
            pis = [entry[3] for entry in pending]
            state.update(position=position, replay={"generator": generator, "cursor": cursor, "pi": pis})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next iterator continues the saved epoch from its position (a state saved
        at the end of an epoch continues with the next epoch)."""
        if state["alpha"].shape != self.alpha.shape:
            raise ValueError(
                f"the saved sampler has {state['alpha'].numel()} bins, this one {self.alpha.numel()}: build it with"
                " the same pool and arguments."
            )
        epoch, position, replay = int(state["epoch"]), int(state.get("position", 0)), state.get("replay")
        if position >= (self.epoch_batches or len(self)):  # the saved epoch was finished: the next one
            epoch, position, replay = epoch + 1, 0, None
        self.epoch = epoch
        self.alpha.copy_(state["alpha"])  # in place: the NumPy views follow
        self.seen.copy_(state["seen"])
        self.forgot.copy_(state["forgot"])
        self._probabilities = None
        self._cursor = int(state["cursor"])
        self._generator.set_state(state["generator"])
        self._history.clear()
        self._position = position
        self._resume = {"position": position, "replay": replay} if position or replay else None
