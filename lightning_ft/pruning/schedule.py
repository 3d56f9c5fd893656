"""The cubic sparsity schedule of movement pruning (Zhu & Gupta 2017; Sanh et al. 2020, ``schedule_threshold``)."""

from __future__ import annotations

__all__ = ["cubic_sparsity"]


def cubic_sparsity(
    step: int, total_steps: int, final: float, start: float = 0.1, end: float = 0.7, initial: float = 0.0
) -> float:
    """Target sparsity at optimizer step ``step`` of ``total_steps``.

    ``initial`` until ``start * total_steps``, then ``final + (initial - final) * (1 - progress) ** 3`` (fast at
    first, slow near the target), and ``final`` from ``end * total_steps`` on; the remaining steps fine-tune with a
    fixed mask. Movement pruning's ``initial_warmup``/``final_warmup`` are the same two points counted in warmup
    steps; here they are shares of the run.

    Example::

        >>> cubic_sparsity(50, 100, 0.5, start=0.0, end=1.0)
        0.4375
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}.")
    t1, t2 = start * total_steps, end * total_steps
    if step <= t1:
        return initial
    if step >= t2:
        return final
    progress = (step - t1) / (t2 - t1)
    return final + (initial - final) * (1.0 - progress) ** 3
