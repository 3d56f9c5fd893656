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
    "BadNets": "lightning_ft.backdoor",
    "Blended": "lightning_ft.backdoor",
    "NeuronLayer": "lightning_ft.backdoor",
    "NeuronWeightChangeReinit": "lightning_ft.backdoor",
    "PoisonedDataset": "lightning_ft.backdoor",
    "ReconstructiveNeuronPruning": "lightning_ft.backdoor",
    "RobustAccuracy": "lightning_ft.backdoor",
    "tsbd": "lightning_ft.backdoor",
    "MemorisationEarlyStopping": "lightning_ft.memorisation",
    "MemorisationMonitor": "lightning_ft.memorisation",
    "MemorisationScore": "lightning_ft.memorisation",
    "NGramRegularizedLM": "lightning_ft.memorisation",
    "NGramRegularizer": "lightning_ft.memorisation",
    "Probe": "lightning_ft.memorisation",
    "ReferenceLogProbDataset": "lightning_ft.memorisation",
    "AnnealingSchedule": "lightning_ft.optim",
    "DynamicBoostedAnnealing": "lightning_ft.optim",
    "GlobalGradient": "lightning_ft.optim",
    "LinearCorrection": "lightning_ft.optim",
    "estimate_global_gradient": "lightning_ft.optim",
    "Chain": "lightning_ft.pruning",
    "ExportReport": "lightning_ft.pruning",
    "GatedLayer": "lightning_ft.pruning",
    "LearnedMaskPruning": "lightning_ft.pruning",
    "NeuronGate": "lightning_ft.pruning",
    "CollateralDamageSampler": "lightning_ft.rehearsal",
    "LossPriorityPolicy": "lightning_ft.rehearsal",
    "MixCDPolicy": "lightning_ft.rehearsal",
    "RandomPolicy": "lightning_ft.rehearsal",
    "ReplayBatchSampler": "lightning_ft.rehearsal",
    "ReplayBudget": "lightning_ft.rehearsal",
    "ReplayPolicy": "lightning_ft.rehearsal",
    "FLOWReweighting": "lightning_ft.rehearsal",
    "FLOWWeightedLoss": "lightning_ft.rehearsal",
    "FLOWWeighting": "lightning_ft.rehearsal",
    "ReferenceStatistics": "lightning_ft.rehearsal",
    "RehearsalDataModule": "lightning_ft.rehearsal",
    "RehearsalFeedback": "lightning_ft.rehearsal",
    "WithSampleIds": "lightning_ft.rehearsal",
}

__all__ = [
    "ActivenessAwareFineTuning",
    "AnnealingSchedule",
    "AttackSuccessRate",
    "BadNets",
    "Blended",
    "Chain",
    "CollateralDamageSampler",
    "DynamicBoostedAnnealing",
    "ExportReport",
    "FLOWReweighting",
    "FLOWWeightedLoss",
    "FLOWWeighting",
    "GatedLayer",
    "GlobalGradient",
    "LearnedMaskPruning",
    "LinearCorrection",
    "LossPriorityPolicy",
    "MemorisationEarlyStopping",
    "MemorisationMonitor",
    "MemorisationScore",
    "MixCDPolicy",
    "NGramRegularizedLM",
    "NGramRegularizer",
    "NeuronGate",
    "NeuronLayer",
    "NeuronWeightChangeReinit",
    "PoisonedDataset",
    "Probe",
    "RandomPolicy",
    "ReconstructiveNeuronPruning",
    "ReferenceLogProbDataset",
    "ReferenceStatistics",
    "RehearsalDataModule",
    "RehearsalFeedback",
    "ReplayBatchSampler",
    "ReplayBudget",
    "ReplayPolicy",
    "RobustAccuracy",
    "WithSampleIds",
    "__version__",
    "estimate_global_gradient",
    "tsbd",
]

if TYPE_CHECKING:
    from lightning_ft.backdoor import (
        ActivenessAwareFineTuning,
        AttackSuccessRate,
        BadNets,
        Blended,
        NeuronLayer,
        NeuronWeightChangeReinit,
        PoisonedDataset,
        ReconstructiveNeuronPruning,
        RobustAccuracy,
        tsbd,
    )
    from lightning_ft.memorisation import (
        MemorisationEarlyStopping,
        MemorisationMonitor,
        MemorisationScore,
        NGramRegularizedLM,
        NGramRegularizer,
        Probe,
        ReferenceLogProbDataset,
    )
    from lightning_ft.optim import (
        AnnealingSchedule,
        DynamicBoostedAnnealing,
        GlobalGradient,
        LinearCorrection,
        estimate_global_gradient,
    )
    from lightning_ft.pruning import (
        Chain,
        ExportReport,
        GatedLayer,
        LearnedMaskPruning,
        NeuronGate,
    )
    from lightning_ft.rehearsal import (
        CollateralDamageSampler,
        FLOWReweighting,
        FLOWWeightedLoss,
        FLOWWeighting,
        LossPriorityPolicy,
        MixCDPolicy,
        RandomPolicy,
        ReferenceStatistics,
        RehearsalDataModule,
        RehearsalFeedback,
        ReplayBatchSampler,
        ReplayBudget,
        ReplayPolicy,
        WithSampleIds,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_ft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
