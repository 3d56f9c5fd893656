"""Replay policies: *what* a rehearsal batch sampler draws from the pool, one class per strategy.

A :class:`ReplayPolicy` holds the pool's reference statistics, gives the pool positions of the next draws from a
generator it is handed (so the sampler decides how draws are seeded), takes feedback (which rehearsed samples were
forgotten) and has a small state. :class:`~lightning_ft.rehearsal.ReplayBatchSampler` decides *how many* and
*when*. Every policy keeps the reported counts (the collateral-damage hit rate); :class:`MixCDPolicy` also steers its
draws with them.

* :class:`RandomPolicy`: uniform over the pool (``"random"``), or over its prior-correct samples
  (``"random_prior_correct"``).
* :class:`LossPriorityPolicy`: the highest reference losses first, cycling through the pool (``"loss_priority"``).
* :class:`MixCDPolicy`: mix-cd's collateral-damage bins (``"mixcd"``; Bai et al., Findings of NAACL 2025).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_ft._internal.validation import check_fraction, check_int

__all__ = [
    "STRATEGIES",
    "LossPriorityPolicy",
    "MixCDPolicy",
    "RandomPolicy",
    "ReplayPolicy",
    "make_policy",
]

Strategy = Literal["mixcd", "random", "random_prior_correct", "loss_priority"]
STRATEGIES: tuple[str, ...] = ("mixcd", "random", "random_prior_correct", "loss_priority")


def _host(values: Tensor | np.ndarray | Sequence[Any]) -> np.ndarray:
    """A NumPy array of ``values`` (a tensor is moved to the host first)."""
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class ReplayPolicy:
    """What to rehearse: a distribution over the pool's bins that feedback may change.

    Subclasses set the bins in ``__init__`` (:meth:`_set_bins`) and may override :meth:`_pi` (the bins'
    probabilities), :meth:`_pick` (the draws) and :meth:`_observe` (the reaction to feedback). By default the bins
    are drawn with :meth:`probabilities` and a sample uniformly inside its bin, with replacement.

    Args:
        pool_loss: reference loss of every pool sample (the starting model's), in pool order.
        pool_correct: whether the starting model gets each pool sample right, in pool order.
    """

    strategy: ClassVar[str]

    def __init__(self, pool_loss: Sequence[float] | Tensor, pool_correct: Sequence[bool] | Tensor) -> None:
        loss = torch.as_tensor(pool_loss, dtype=torch.float32).flatten()
        correct = torch.as_tensor(pool_correct).bool().flatten()
        if loss.numel() == 0:
            raise ValueError("the rehearsal pool is empty: pass at least one pool sample (or use no sampler).")
        if correct.shape != loss.shape:
            raise ValueError(f"`pool_correct` has {correct.numel()} entries for {loss.numel()} pool losses.")
        if not bool(torch.isfinite(loss).all()):
            raise ValueError("`pool_loss` has NaN or infinite values; drop those samples from the pool.")
        self.pool_loss, self.pool_correct = loss, correct
        self._pool_correct = correct.numpy()

    def _set_bins(self, bins: Tensor, used: Tensor, num_bins: int) -> None:
        """Bins ``bins`` (of every pool position; meaningful for the positions in ``used``, the ones drawn from)."""
        self.num_bins = num_bins
        self.bin_of = bins
        self.bin_sizes = torch.bincount(bins[used], minlength=num_bins)
        self.seen = torch.zeros(num_bins, dtype=torch.long)  # rehearsed samples reported per bin
        self.forgot = torch.zeros(num_bins, dtype=torch.long)  # ... of which forgotten
        order = used[torch.argsort(bins[used], stable=True)]
        self._bin_of = bins.numpy()
        self._members = order.numpy()  # pool positions grouped by bin
        self._sizes = self.bin_sizes.numpy()
        self._sizes_f = self._sizes.astype(np.float32)
        self._starts = np.cumsum(self._sizes) - self._sizes

    def __len__(self) -> int:
        return int(self.pool_loss.numel())

    # the per-step bookkeeping runs on NumPy views of the state tensors (a few microseconds per operation, against tens
    # for small torch ops); taken afresh at each use, so copies, pickles and reassigned tensors never go stale
    @property
    def _seen(self) -> np.ndarray:
        return self.seen.numpy()

    @property
    def _forgot(self) -> np.ndarray:
        return self.forgot.numpy()

    # ------------------------------------------------------------------------------------------------ drawing
    def probabilities(self) -> Tensor:
        """The probability of drawing each bin at the next step (a copy)."""
        return torch.from_numpy(self._pi().copy())

    def _pi(self) -> np.ndarray:
        return self._sizes_f / self._sizes_f.sum()

    def draw_state(self) -> Any:
        """What :meth:`sample` draws with, for a sampler to draw a batch again as it was (None: nothing changes)."""
        return None

    def sample(self, count: int, generator: torch.Generator, offset: int = 0, draw_state: Any = None) -> np.ndarray:
        """Pool positions of ``count`` draws.

        Args:
            count: the number of draws.
            generator: the draws' random stream (the sampler seeds it per step and rank).
            offset: the draws' place in a deterministic cycle (:class:`LossPriorityPolicy`); ignored otherwise.
            draw_state: a :meth:`draw_state` to draw with instead of the current one.
        """
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        return self._pick(count, generator, offset, draw_state)

    def _pick(self, count: int, generator: torch.Generator, offset: int, draw_state: Any) -> np.ndarray:
        pi = self._pi() if draw_state is None else draw_state
        bins = torch.multinomial(torch.from_numpy(pi), count, replacement=True, generator=generator).numpy()
        uniform = torch.rand(count, generator=generator).numpy()
        offsets = np.minimum((uniform * self._sizes_f[bins]).astype(np.int64), self._sizes[bins] - 1)
        return self._members[self._starts[bins] + offsets]

    # ------------------------------------------------------------------------------------------------ feedback
    def forgotten(self, pool_positions: np.ndarray, correct: np.ndarray) -> np.ndarray:
        """Collateral damage: which rehearsed samples the prior model got right and the current one gets wrong."""
        return self._pool_correct[pool_positions] & ~correct

    def update(self, pool_positions: Tensor | np.ndarray, forgot: Tensor | np.ndarray) -> None:
        """Record which rehearsed pool samples were forgotten (prior-correct and now wrong) in the training pass.

        Call it with the same (all-gathered) values on every rank, so the state stays identical across ranks.
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
        seen_total, forgot_total = self._seen, self._forgot  # views: updated in place
        seen_total += seen
        forgot_total += hits
        self._observe(seen, hits)

    def _observe(self, seen: np.ndarray, hits: np.ndarray) -> None:
        """React to one update's per-bin counts (nothing by default)."""

    @property
    def hit_rate(self) -> float:
        """Share of all reported rehearsal samples that were collateral damage (forgotten)."""
        total = int(self._seen.sum())
        return float(self._forgot.sum()) / total if total else float("nan")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "seen": self.seen.clone(), "forgot": self.forgot.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seen"].shape != self.seen.shape:
            raise ValueError(
                f"the saved policy has {state['seen'].numel()} bins, this one {self.seen.numel()}: build it with the"
                " same pool and arguments."
            )
        saved = state.get("strategy", self.strategy)
        if saved != self.strategy:
            raise ValueError(f"the saved policy is {saved!r}, this one {self.strategy!r}: build it with the same one.")
        self.seen.copy_(state["seen"])  # in place: the NumPy views follow
        self.forgot.copy_(state["forgot"])


class RandomPolicy(ReplayPolicy):
    """Uniform over the pool (``prior_correct_only=False``: strategy ``"random"``) or over the samples the starting
    model gets right (strategy ``"random_prior_correct"``).

    Example::

        policy = RandomPolicy(pool_loss, pool_correct, prior_correct_only=True)
    """

    def __init__(
        self,
        pool_loss: Sequence[float] | Tensor,
        pool_correct: Sequence[bool] | Tensor,
        prior_correct_only: bool = False,
    ) -> None:
        super().__init__(pool_loss, pool_correct)
        self.prior_correct_only = bool(prior_correct_only)
        pool = torch.arange(len(self))
        used = pool[self.pool_correct] if prior_correct_only else pool
        if used.numel() == 0:
            raise ValueError("no pool sample is correct under the prior model: nothing to rehearse.")
        self._set_bins(torch.zeros(len(self), dtype=torch.long), used, 1)

    @property
    def strategy(self) -> str:  # type: ignore[override]
        return "random_prior_correct" if self.prior_correct_only else "random"


class LossPriorityPolicy(ReplayPolicy):
    """The highest reference losses first, cycling through the whole pool in that order (strategy
    ``"loss_priority"``): draw ``i`` of the cycle is the pool sample of rank ``(offset + i) mod M`` by descending
    loss, so the sampler's ``offset`` (the fit's draws before this one) alone fixes the draws.

    Example::

        policy = LossPriorityPolicy(pool_loss, pool_correct)
    """

    strategy = "loss_priority"

    def __init__(self, pool_loss: Sequence[float] | Tensor, pool_correct: Sequence[bool] | Tensor) -> None:
        super().__init__(pool_loss, pool_correct)
        self._set_bins(torch.zeros(len(self), dtype=torch.long), torch.arange(len(self)), 1)
        self._priority = torch.argsort(self.pool_loss, descending=True, stable=True).numpy()

    def _pick(self, count: int, generator: torch.Generator, offset: int, draw_state: Any) -> np.ndarray:
        return self._priority[(offset + np.arange(count)) % self._priority.size]


class MixCDPolicy(ReplayPolicy):
    """mix-cd: rehearse the bins of the pool that the fine-tuning damages (strategy ``"mixcd"``).

    The pool's prior-correct samples are split into ``num_bins`` quantile bins of reference loss (prior-incorrect
    samples can never be collateral damage: excluded, or their own bin). Bin ``k`` is drawn with probability
    ``pi_k = (1 - epsilon) * |B_k| max(alpha_k, alpha_min) / Z + epsilon * |B_k| / M`` and a sample uniformly (with
    replacement) inside it; ``alpha_k``, the bin's collateral-damage rate, starts at ``alpha_init`` (so early draws are
    uniform) and follows a count-weighted exponential moving average of the forgotten share of the bin's rehearsed
    samples reported to :meth:`update`: a bin seen ``n`` times at share ``rate`` moves to
    ``(1 - beta)^n alpha + (1 - (1 - beta)^n) rate``, the same as ``n`` single-sample updates with that share, so
    splitting the same observations into more steps or over more ranks (world size, replay count) changes the rates
    only through the order of the outcomes; ``beta`` is the weight of one observation. With ``pool_groups`` (e.g. the
    pool's class labels) every group is binned on its own, giving up to ``groups x num_bins`` bins (reference loss x
    group). The estimator, the allocation and the exploration are our reconstruction (see the method card).

    Args:
        pool_loss, pool_correct: see :class:`ReplayPolicy`.
        num_bins: quantile bins of reference loss, per group when ``pool_groups`` is given.
        pool_groups: an integer group of every pool sample, in pool order; None: one group.
        exclude_prior_incorrect: never rehearse prior-incorrect samples; False gives them their own bin.
        epsilon: share of uniform (by bin size) exploration in ``pi``, in [0, 1].
        alpha_min: floor of the rates in ``pi`` (no bin starves), >= 0.
        alpha_init: starting rate of every bin, in [0, 1].
        beta: EMA weight of one observation, in (0, 1].

    Example::

        policy = MixCDPolicy(pool_loss, pool_correct, num_bins=10)
        positions = policy.sample(4, torch.Generator().manual_seed(0))
        policy.update(positions, forgot=policy.forgotten(positions, correct_now))

    Reference: Bai, Yeh, Hsieh, Taly, "An Efficient Rehearsal Scheme for Catastrophic Forgetting Mitigation during
    Multi-stage Fine-tuning", Findings of NAACL 2025, arXiv:2402.08096.
    """

    strategy = "mixcd"

    def __init__(
        self,
        pool_loss: Sequence[float] | Tensor,
        pool_correct: Sequence[bool] | Tensor,
        num_bins: int = 10,
        pool_groups: Sequence[int] | Tensor | None = None,
        exclude_prior_incorrect: bool = True,
        epsilon: float = 0.05,
        alpha_min: float = 0.01,
        alpha_init: float = 1.0,
        beta: float = 0.1,
    ) -> None:
        _check_mixcd(num_bins, epsilon, alpha_min, alpha_init, beta)
        super().__init__(pool_loss, pool_correct)
        self.pool_groups = _check_groups(pool_groups, len(self))
        self.epsilon, self.alpha_min, self.beta = float(epsilon), float(alpha_min), float(beta)
        self._build_bins(num_bins, exclude_prior_incorrect)
        self.alpha = torch.full((self.num_bins,), float(alpha_init))
        self._probabilities: np.ndarray | None = None  # pi, cached until the next update

    def _build_bins(self, num_bins: int, exclude_prior_incorrect: bool) -> None:
        pool = torch.arange(len(self))
        eligible = pool[self.pool_correct]
        if eligible.numel() == 0 and exclude_prior_incorrect:
            raise ValueError("no pool sample is correct under the prior model: mix-cd has nothing to rehearse.")
        bins = torch.zeros(len(self), dtype=torch.long)
        k = 0
        groups = self.pool_groups[eligible] if self.pool_groups is not None else torch.zeros_like(eligible)
        for group in torch.unique(groups):  # sorted: the same bins on every rank
            members = eligible[groups == group]
            k_g = min(num_bins, members.numel())
            edges = torch.quantile(self.pool_loss[members], torch.linspace(0, 1, k_g + 1)[1:-1])
            bins[members] = k + torch.bucketize(self.pool_loss[members], edges, right=True)
            k += k_g
        k = max(k, 1)
        used = [eligible]
        if not exclude_prior_incorrect and bool((~self.pool_correct).any()):
            bins[~self.pool_correct] = k
            k += 1
            used.append(pool[~self.pool_correct])
        self._set_bins(bins, torch.cat(used), k)

    @property
    def _alpha(self) -> np.ndarray:
        return self.alpha.numpy()

    def _pi(self) -> np.ndarray:
        # cached until the next update() or load_state_dict(): change the rates through those, not in place
        if self._probabilities is None:
            sizes = self._sizes_f
            uniform = sizes / sizes.sum()
            weighted = sizes * np.maximum(self._alpha, np.float32(self.alpha_min))
            total = weighted.sum()
            greedy = weighted / total if total > 0 else uniform
            self._probabilities = np.float32(1.0 - self.epsilon) * greedy + np.float32(self.epsilon) * uniform
        return self._probabilities

    def draw_state(self) -> np.ndarray:
        return self._pi()

    def _observe(self, seen: np.ndarray, hits: np.ndarray) -> None:
        # count-weighted: a bin seen n times moves as n single-sample updates with its mean forgotten share would;
        # a bin not seen keeps its rate exactly (keep = 1, and the float32 rate round-trips through float64)
        keep = (1.0 - self.beta) ** seen
        rate = hits / np.maximum(seen, 1)
        alpha = self._alpha  # a view: updated in place
        alpha[:] = keep * alpha + (1.0 - keep) * rate
        self._probabilities = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha.copy_(state["alpha"])
        self._probabilities = None


def _check_mixcd(num_bins: int, epsilon: float, alpha_min: float, alpha_init: float, beta: float) -> None:
    check_int("num_bins", num_bins)
    check_fraction("epsilon", epsilon, closed_right=True)
    check_fraction("alpha_init", alpha_init, closed_right=True)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta` must be in (0, 1], got {beta!r}.")
    if isinstance(alpha_min, bool) or not isinstance(alpha_min, (int, float)) or not alpha_min >= 0.0:
        raise ValueError(f"`alpha_min` must be >= 0, got {alpha_min!r}.")


def _check_groups(pool_groups: Sequence[int] | Tensor | None, size: int) -> Tensor | None:
    if pool_groups is None:
        return None
    groups = torch.as_tensor(pool_groups).flatten()
    if groups.numel() != size or groups.is_floating_point() or groups.dtype == torch.bool:
        raise ValueError(
            f"`pool_groups` must hold one integer group per pool sample ({size}), got {groups.numel()} values of type"
            f" {groups.dtype}."
        )
    return groups


def make_policy(
    strategy: str,
    pool_loss: Sequence[float] | Tensor,
    pool_correct: Sequence[bool] | Tensor,
    num_bins: int = 10,
    pool_groups: Sequence[int] | Tensor | None = None,
    exclude_prior_incorrect: bool = True,
    epsilon: float = 0.05,
    alpha_min: float = 0.01,
    alpha_init: float = 1.0,
    beta: float = 0.1,
) -> ReplayPolicy:
    """The policy of ``strategy`` (one of :data:`STRATEGIES`). The mix-cd arguments are used by ``"mixcd"`` and
    checked for every strategy, so a bad value fails whatever the strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "mixcd":
        mixcd = (num_bins, pool_groups, exclude_prior_incorrect, epsilon, alpha_min, alpha_init, beta)
        return MixCDPolicy(pool_loss, pool_correct, *mixcd)
    _check_mixcd(num_bins, epsilon, alpha_min, alpha_init, beta)
    _check_groups(pool_groups, torch.as_tensor(pool_loss).numel())
    if strategy == "loss_priority":
        return LossPriorityPolicy(pool_loss, pool_correct)
    return RandomPolicy(pool_loss, pool_correct, prior_correct_only=strategy == "random_prior_correct")
