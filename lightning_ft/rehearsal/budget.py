"""How much a rehearsal batch sampler replays: the pool samples (or tokens) of every batch of the fit."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lightning_ft._internal.validation import check_fraction, check_int

__all__ = ["ReplayBudget"]

Budget = Literal["samples", "tokens"]


class ReplayBudget:
    """The replay share of every batch of the fit, and the pool samples that follow from it.

    ``replay_per_step`` rehearses that many pool samples in every batch. A ratio (``replay_ratio``, or the
    piecewise-linear ``replay_schedule`` over the fit's ``schedule_batches`` batches) sets the share ``r / (b + r)``
    of each batch; the fractional counts carry over, so the fit's first ``n`` batches rehearse ``round(E(n))`` pool
    samples, ``E(n)`` the sum of the batches' ``batch_size * share / (1 - share)`` (:meth:`count`): small batches keep
    their share (batch 4 at 10%: 4 pool samples every 9 batches, not none), and the count of a batch follows from its
    index alone. With ``budget="tokens"`` the share counts tokens (:meth:`tokens`).

    Args:
        batch_size: fine-tuning samples per batch (per rank).
        replay_ratio: share of each batch taken from the pool, in [0, 1).
        replay_per_step: absolute number of pool samples per batch (overrides ``replay_ratio``).
        replay_schedule: ``(progress, ratio)`` points (overrides ``replay_ratio``; not with ``replay_per_step``);
            progress in [0, 1] and non-decreasing, ratios in [0, 1); the share is held before the first point and
            after the last.
        schedule_batches: the batches the schedule's progress runs over (the whole fit).
        budget: ``"samples"`` or ``"tokens"`` (a ratio of tokens; not with ``replay_per_step``).

    Example::

        budget = ReplayBudget(batch_size=4, replay_ratio=0.1)
        [budget.count(b) for b in range(9)]  # 4 pool samples in 9 batches: [0, 1, 0, 1, 0, 1, 0, 1, 0]
    """

    def __init__(
        self,
        batch_size: int,
        replay_ratio: float = 0.25,
        replay_per_step: int | None = None,
        replay_schedule: Sequence[Sequence[float]] | None = None,
        schedule_batches: int | None = None,
        budget: Budget = "samples",
    ) -> None:
        check_int("batch_size", batch_size)
        check_int("replay_per_step", replay_per_step, minimum=0, allow_none=True)
        check_fraction("replay_ratio", replay_ratio)
        self.schedule = self._check_schedule(replay_schedule, replay_per_step, schedule_batches)
        if budget not in ("samples", "tokens"):
            raise ValueError(f"`budget` must be 'samples' or 'tokens', got {budget!r}.")
        if budget == "tokens" and replay_per_step is not None:
            raise ValueError(
                "`budget='tokens'` sets the replay by a ratio of tokens: pass `replay_ratio` or `replay_schedule`,"
                " not `replay_per_step`."
            )
        self.batch_size, self.kind = batch_size, budget
        self.replay_ratio, self.per_step, self.schedule_batches = float(replay_ratio), replay_per_step, schedule_batches
        self._cumulative: np.ndarray | None = None  # expected pool samples of the schedule's first n batches
        # the count of one batch, rounded (a sampler's default for draws outside its iteration)
        if replay_per_step is not None:
            self.replay = replay_per_step
        else:
            self.replay = round(self._expected(self.schedule[0][1] if self.schedule else self.replay_ratio))

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
            check_fraction("replay_schedule progress", progress, closed_right=True)
            check_fraction("replay_schedule ratio", ratio)
        if any(b[0] < a[0] for a, b in itertools.pairwise(points)):
            raise ValueError(f"`replay_schedule` progress must be non-decreasing, got {[p for p, _ in points]}.")
        return points

    def _expected(self, ratio: float) -> float:
        """The expected pool samples next to ``batch_size`` fine-tuning ones at replay share ``ratio``."""
        return self.batch_size * ratio / (1.0 - ratio)

    def share(self, batch: int) -> float:
        """The replay share ``r / (b + r)`` of the fit's ``batch``-th batch."""
        if self.schedule is None:
            return self.replay_ratio
        assert self.schedule_batches is not None
        progress = min(batch / self.schedule_batches, 1.0)
        points = self.schedule
        i = bisect.bisect_right([p for p, _ in points], progress)
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        (p0, r0), (p1, r1) = points[i - 1], points[i]
        return r0 + (r1 - r0) * (progress - p0) / (p1 - p0)

    def max_share(self) -> float:
        """The largest share of the fit."""
        return self.replay_ratio if self.schedule is None else max(r for _, r in self.schedule)

    def _shares(self) -> np.ndarray:
        """:meth:`share` of every batch of the schedule, vectorised (the same arithmetic)."""
        assert self.schedule is not None and self.schedule_batches is not None
        progress = np.minimum(np.arange(self.schedule_batches, dtype=np.float64) / self.schedule_batches, 1.0)
        ps = np.array([p for p, _ in self.schedule])
        rs = np.array([r for _, r in self.schedule])
        if len(ps) == 1:
            return np.full(progress.shape, rs[0])
        i = np.searchsorted(ps, progress, side="right")  # bisect_right
        inner = np.clip(i, 1, len(ps) - 1)
        p0, p1, r0, r1 = ps[inner - 1], ps[inner], rs[inner - 1], rs[inner]
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = r0 + (r1 - r0) * (progress - p0) / (p1 - p0)
        return np.where(i == 0, rs[0], np.where(i == len(ps), rs[-1], shares))

    def expected(self, batches: int) -> float:
        """The expected pool samples of the fit's first ``batches`` batches (a ratio: the sum of every batch's
        ``batch_size * share / (1 - share)``; ``replay_per_step``: ``batches * replay_per_step``)."""
        if self.per_step is not None:
            return float(batches * self.per_step)
        if self.schedule is None:
            return batches * self._expected(self.replay_ratio)
        assert self.schedule_batches is not None
        if self._cumulative is None:  # the schedule's running sum, once: the share is constant past its end
            self._cumulative = np.concatenate([[0.0], np.cumsum(self._expected(self._shares()))])
        past = max(batches - self.schedule_batches, 0)
        cumulative = self._cumulative[min(batches, self.schedule_batches)]
        return float(cumulative + past * self._expected(self.share(self.schedule_batches)))

    def cumulative(self, batches: int) -> int:
        """Pool samples of the fit's first ``batches`` batches: ``round(E(batches))``, rounded half up."""
        return math.floor(self.expected(batches) + 0.5)

    def count(self, batch: int) -> int:
        """Pool samples in the fit's ``batch``-th batch (``budget="samples"``): ``replay_per_step``, or with a ratio
        ``round(E(batch + 1)) - round(E(batch))``, within half a sample of the ratio over every prefix of the fit."""
        if self.per_step is not None:
            return self.per_step
        return self.cumulative(batch + 1) - self.cumulative(batch)

    def tokens(self, finetune_tokens: float, batch: int) -> float:
        """The pool tokens the fit's ``batch``-th batch rehearses next to ``finetune_tokens`` fine-tuning tokens
        (``budget="tokens"``): ``finetune_tokens * share / (1 - share)``."""
        share = self.share(batch)
        return float(finetune_tokens) * share / (1.0 - share)
