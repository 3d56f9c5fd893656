"""torchmetrics metric accumulating the memorisation scores of greedy continuations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_ft.memorisation.functional import (
    Match,
    exact_match,
    ngram_memorisation_score,
    token_accuracy,
    validate_ngram_sizes,
)

__all__ = ["MemorisationScore"]


class MemorisationScore(Metric):
    """Mean n-gram memorisation score, exact-match (k-extractable) rate and token accuracy over a probe set.

    States are sums and a count with ``dist_reduce_fx="sum"``, so the value computed after a DDP sync equals the
    value over the union of every rank's samples (shard the probe, do not pad it).

    Args:
        n: n-gram sizes for :func:`~lightning_ft.memorisation.functional.ngram_memorisation_score`.
        match: ``"bag"`` or ``"positional"``.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example::

        >>> metric = MemorisationScore(n=(2,))
        >>> metric.update(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]]))
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'ngram': 0.667, 'exact': 0.0, 'token_acc': 0.75}
    """

    is_differentiable = False
    higher_is_better = False  # more memorisation is worse
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    ngram_sum: Tensor
    exact_sum: Tensor
    token_acc_sum: Tensor
    total: Tensor

    def __init__(self, n: int | Sequence[int] = (4, 5, 6), match: Match = "bag", **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.n = validate_ngram_sizes(n)
        if match not in ("bag", "positional"):
            raise ValueError(f'`match` must be "bag" or "positional", got {match!r}.')
        self.match = match
        for name in ("ngram_sum", "exact_sum", "token_acc_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.last_scores: Tensor | None = None

    def update(self, generated: Tensor, reference: Tensor) -> None:
        """Add a batch of greedy continuations ``(B, S)`` and their true suffixes ``(B, S)``.

        The batch's per-sample scores stay available as :attr:`last_scores` (``(B, 3)``: ngram, exact, token_acc),
        so callers that also need them (e.g. for a table of examples) do not score twice.
        """
        scores = torch.stack(
            [
                ngram_memorisation_score(generated, reference, self.n, self.match),
                exact_match(generated, reference),
                token_accuracy(generated, reference),
            ],
            dim=-1,
        ).reshape(-1, 3)
        self.last_scores = scores
        self.ngram_sum += scores[:, 0].double().sum()
        self.exact_sum += scores[:, 1].double().sum()
        self.token_acc_sum += scores[:, 2].double().sum()
        self.total += scores.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``{"ngram", "exact", "token_acc"}`` means over every sample seen (NaN before any update)."""
        total = self.total.double()
        return {
            "ngram": (self.ngram_sum / total).float(),
            "exact": (self.exact_sum / total).float(),
            "token_acc": (self.token_acc_sum / total).float(),
        }
