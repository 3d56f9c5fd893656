"""Optimisation family: Dynamic Boosted Annealing (DBA, Tang et al. 2025).

* :func:`estimate_global_gradient`: the mean general-data gradient at the starting weights (DBA's zero-learning-rate
  pass), dense or low-rank, as a :class:`GlobalGradient` (saved, loaded, reused across domains);
* :func:`boost_gradients_`, :func:`boost_coefficient`, :class:`LinearCorrection`: one DBA step on the gradients, the
  boost schedule ``k_t`` and the dynamic correction ``c_t`` (both reconstructions: the paper does not give them);
* :class:`AnnealingSchedule`: a warm-up + cosine multiplier for ``LambdaLR`` (DBA's annealing, shape ours);
* :class:`DynamicBoostedAnnealing`: the Lightning callback running all of it in a fit.
"""

from lightning_ft.optim.callbacks import DynamicBoostedAnnealing
from lightning_ft.optim.dba import (
    AnnealingSchedule,
    GlobalGradient,
    LinearCorrection,
    batch_loss,
    boost_coefficient,
    boost_gradients_,
    estimate_global_gradient,
    resolve_k0,
)

__all__ = [
    "AnnealingSchedule",
    "DynamicBoostedAnnealing",
    "GlobalGradient",
    "LinearCorrection",
    "batch_loss",
    "boost_coefficient",
    "boost_gradients_",
    "estimate_global_gradient",
    "resolve_k0",
]
