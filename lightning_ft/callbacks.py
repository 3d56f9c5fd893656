"""Every lightning-ft callback, importable by short name (LightningCLI: ``class_path: MemorisationMonitor``)."""

from lightning_ft.backdoor.activeness import ActivenessAwareFineTuning
from lightning_ft.backdoor.callbacks import NeuronWeightChangeReinit
from lightning_ft.backdoor.rnp import ReconstructiveNeuronPruning
from lightning_ft.memorisation.callbacks import MemorisationEarlyStopping, MemorisationMonitor
from lightning_ft.optim.callbacks import DynamicBoostedAnnealing
from lightning_ft.pruning.callbacks import LearnedMaskPruning
from lightning_ft.rehearsal.callbacks import FLOWReweighting, RehearsalFeedback

__all__ = [
    "ActivenessAwareFineTuning",
    "DynamicBoostedAnnealing",
    "FLOWReweighting",
    "LearnedMaskPruning",
    "MemorisationEarlyStopping",
    "MemorisationMonitor",
    "NeuronWeightChangeReinit",
    "ReconstructiveNeuronPruning",
    "RehearsalFeedback",
]
