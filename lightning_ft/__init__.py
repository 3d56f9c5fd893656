"""lightning-ft: fine-tuning techniques for PyTorch Lightning.

Each technique is a Lightning ``Callback``, a ``LightningModule`` mixin or a sampler with a pure functional core.
The names below are imported lazily, so ``import lightning_ft`` (and the ``lightning-ft`` command) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ActivenessAwareFineTuning": "lightning_ft.backdoor",
    "AttackSuccessRate": "lightning_ft.backdoor",
    "FLOWReweighting": "lightning_ft.rehearsal",
    "FLOWWeightedLoss": "lightning_ft.rehearsal",
    "FLOWWeighting": "lightning_ft.rehearsal",
    "LearnedMaskPruning": "lightning_ft.pruning",
    "NeuronWeightChangeReinit": "lightning_ft.backdoor",
    "ReconstructiveNeuronPruning": "lightning_ft.pruning",
    "ReferenceStatistics": "lightning_ft.rehearsal",
    "MemorisationEarlyStopping": "lightning_ft.memorisation",
    "MemorisationMonitor": "lightning_ft.memorisation",
    "MemorisationScore": "lightning_ft.memorisation",
    "NGramRegularizedLM": "lightning_ft.memorisation",
    "NGramRegularizer": "lightning_ft.memorisation",
    "tsbd": "lightning_ft.backdoor",
}

__all__ = [
    "ActivenessAwareFineTuning",
    "AttackSuccessRate",
    "FLOWReweighting",
    "FLOWWeightedLoss",
    "FLOWWeighting",
    "LearnedMaskPruning",
    "MemorisationEarlyStopping",
    "MemorisationMonitor",
    "MemorisationScore",
    "NGramRegularizedLM",
    "NGramRegularizer",
    "NeuronWeightChangeReinit",
    "ReconstructiveNeuronPruning",
    "ReferenceStatistics",
    "__version__",
    "tsbd",
]

if TYPE_CHECKING:
    from lightning_ft.backdoor import ActivenessAwareFineTuning, AttackSuccessRate, NeuronWeightChangeReinit, tsbd
    from lightning_ft.memorisation import (
        MemorisationEarlyStopping,
        MemorisationMonitor,
        MemorisationScore,
        NGramRegularizedLM,
        NGramRegularizer,
    )
    from lightning_ft.pruning import LearnedMaskPruning, ReconstructiveNeuronPruning
    from lightning_ft.rehearsal import FLOWReweighting, FLOWWeightedLoss, FLOWWeighting, ReferenceStatistics


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_ft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
