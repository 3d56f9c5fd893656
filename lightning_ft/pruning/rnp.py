"""Deprecated location of RNP: use :mod:`lightning_ft.backdoor.rnp` (``from lightning_ft.backdoor import
ReconstructiveNeuronPruning``). Importing this module warns (``FutureWarning``); it will be removed in the next
release."""

from __future__ import annotations

import warnings
from typing import Any

from lightning_ft.backdoor import rnp as _rnp
from lightning_ft.backdoor.rnp import ReconstructiveNeuronPruning, rnp_prune_, rnp_recover_masks, rnp_unlearn

__all__ = ["ReconstructiveNeuronPruning", "rnp_prune_", "rnp_recover_masks", "rnp_unlearn"]

warnings.warn(
    "`lightning_ft.pruning.rnp` moved to `lightning_ft.backdoor.rnp` (RNP is a backdoor defense): import from"
    " `lightning_ft.backdoor` instead, e.g. `from lightning_ft.backdoor import ReconstructiveNeuronPruning`."
    " The old path will be removed in the next release.",
    FutureWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    # the module's other (private) names, for code that reached into it
    return getattr(_rnp, name)
