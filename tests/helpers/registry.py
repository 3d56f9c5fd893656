"""Registry of every public lightning-ft callback with a tiny model, data and kwargs (as Composer's algorithm tests).

Generic tests (``tests/test_registry.py``) run over the whole registry: a fit runs, stop-and-resume equals an
uninterrupted run, 2-process DDP keeps ranks equal, the YAML snippet in ``callbacks/`` exists, and all callbacks
compose in one Trainer. A new callback gets all of that by adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset

import lightning_ft.callbacks as ft_callbacks
from tests.helpers.data import digits, flow_datamodule, pydoc_datamodule, rehearsal_datamodule, small_digits_datamodule
from tests.helpers.kinds import CLASSIFIER_KINDS, LM_KINDS
from tests.helpers.models import tiny_classifier, tiny_lm_module, tiny_mlp_classifier

__all__ = ["REGISTRY", "Entry"]

_PROBE = {"probe_size": 8, "prefix_len": 16, "suffix_len": 16, "ngram_sizes": [2, 3], "batch_size": 4}


def _general_digits() -> DataLoader:
    """DBA's general data for the digits entries: 48 inverted digits with labels + 3 (a task that conflicts with the
    plain digits the registry fine-tunes on), in order."""
    x, y = digits(8)
    return DataLoader(TensorDataset(1 - x[1000:1048], (y[1000:1048] + 3) % 10), batch_size=16)


@dataclass
class Entry:
    """How to exercise one callback: its class, init kwargs, and factories for a module and data it works on."""

    cls: type[pl.Callback]
    kwargs: dict[str, Any]
    make_module: Callable[[], pl.LightningModule] = tiny_lm_module
    make_data: Callable[[], pl.LightningDataModule] = pydoc_datamodule
    yaml: str = ""
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    # a metric logged alongside this callback and its better direction, for ModelCheckpoint in the composition test
    monitor: tuple[str, str] = ("mem/ngram", "min")
    # the composition test fits a model family's callbacks on the data (and module, monitor) of its entry with the
    # highest value: data that one callback requires (RehearsalFeedback's sampler) and the others accept
    group_data_priority: int = 0
    # --- conformance (tests/test_conformance.py) ---
    # a metric the callback logs itself, monitored by ModelCheckpoint in the observability test ("" = logs none)
    metric: str = ""
    # model kinds from tests/helpers/kinds.py the callback is run on (besides make_module)
    kinds: tuple[str, ...] = ()
    # kind -> regex of the clear error the callback must raise at setup/train start for it (unsupported kinds)
    kind_errors: dict[str, str] = field(default_factory=dict)
    # whether the callback did its job in a fit (not only ran): (callback, trainer) -> bool; checked on every model
    # kind and precision, so a callback that silently does nothing there fails
    worked: Callable[[Any, pl.Trainer], bool] | None = None
    # non-essential init kwargs a resumed fit may change: the callback's state must still be found (stable state_key)
    resume_overrides: dict[str, Any] = field(default_factory=dict)
    # an essential init kwarg changed on resume: the callback must refuse its checkpointed state (ValueError naming
    # the argument) rather than silently start afresh or run a one-off phase again
    essential_change: dict[str, Any] = field(default_factory=dict)
    # kind -> init kwargs replacing the entry's for that kind (e.g. the layers to gate on a ViT)
    kind_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Trainer setting of the conformance suite ("bf16-true", "accumulate_grad_batches", ...) -> regex of the clear
    # error the callback raises at setup for it (unsupported settings)
    setting_errors: dict[str, str] = field(default_factory=dict)
    # the data module resumes mid-epoch by itself (otherwise the suite wraps it in MidEpochResumable)
    native_mid_epoch: bool = False
    # what a W&B run receives, as the method card promises: key -> "scalar" | "histogram" | "table" | "chart"
    wandb_keys: dict[str, str] = field(default_factory=dict)
    # extra init kwargs for the W&B test (e.g. switch on an optional table)
    wandb_kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self, kind: str | None = None) -> pl.Callback:
        return self.cls(**{**self.kwargs, **self.kind_kwargs.get(kind or "", {})})

    def module_of_kind(self, kind: str) -> pl.LightningModule:
        factories = LM_KINDS if self.make_module is tiny_lm_module else CLASSIFIER_KINDS
        return factories[kind]()


REGISTRY: dict[str, Entry] = {
    "DynamicBoostedAnnealing": Entry(
        ft_callbacks.DynamicBoostedAnnealing,
        # rank 2: the checkpointed factors stay well under the model's size; an explicit total: the stopped run of the
        # resume test is a shorter fit of the same schedule
        {
            "general_dataloader": _general_digits(),
            "general_batches": 3,
            "k0": 0.5,
            "gamma": 0.5,
            "rank": 2,
            "total_steps": 12,
        },
        make_module=tiny_mlp_classifier,
        make_data=small_digits_datamodule,
        yaml="dynamic_boosted_annealing.yaml",
        worked=lambda cb, trainer: cb.ghat is not None and 0 < cb.steps == trainer.global_step,
        resume_overrides={"gamma": 0.0, "progress_bar": False},
        essential_change={"rank": 3},
        monitor=("val_acc", "max"),
        metric="dba/cos",
        wandb_keys={"dba/k": "scalar", "dba/cos": "scalar", "dba/c": "scalar"},
        kinds=("dict", "model_output", "user_loss", "timm_resnet", "timm_vit"),
    ),
    "MemorisationMonitor": Entry(
        ft_callbacks.MemorisationMonitor,
        dict(_PROBE),
        yaml="memorisation_monitor.yaml",
        worked=lambda cb, trainer: len(cb.history) >= 2,
        resume_overrides={"check_every_n_epochs": 2, "log_examples": 0},
        essential_change={"probe_size": 4},
        metric="mem/ngram",
        kinds=("peft_lora",),
        wandb_keys={"mem/ngram": "scalar", "mem/exact": "scalar", "mem/token_acc": "scalar", "mem/examples": "table"},
        wandb_kwargs={"log_examples": 2},
    ),
    "MemorisationEarlyStopping": Entry(
        ft_callbacks.MemorisationEarlyStopping,
        {**_PROBE, "max_rise": 0.5, "restore_best": True, "verbose": False},
        yaml="memorisation_early_stopping.yaml",
        worked=lambda cb, trainer: len(cb.history) >= 2,
        resume_overrides={"verbose": True, "log_examples": 0},
        essential_change={"probe_size": 4},
        metric="mem/ngram",
        kinds=("peft_lora",),
        wandb_keys={"mem/ngram": "scalar", "mem/exact": "scalar", "mem/token_acc": "scalar", "mem/examples": "table"},
        wandb_kwargs={"log_examples": 2},
    ),
    "NeuronWeightChangeReinit": Entry(
        ft_callbacks.NeuronWeightChangeReinit,
        {"neuron_ratio": 0.3, "lr_unlearn": 1e-2, "max_unlearn_epochs": 5},
        make_module=tiny_classifier,
        make_data=small_digits_datamodule,
        yaml="neuron_weight_change_reinit.yaml",
        worked=lambda cb, trainer: cb.done and cb.report["zeroed_weights"] > 0,
        resume_overrides={"max_unlearn_epochs": 7, "progress_bar": None},
        essential_change={"neuron_ratio": 0.5},
        monitor=("val_acc", "max"),
        metric="backdoor/nwc_selected_neurons",
        wandb_keys={
            "backdoor/nwc_selected_neurons": "scalar",
            "backdoor/nwc_seconds": "scalar",
            "backdoor/nwc": "histogram",
        },
        kinds=("dict", "model_output", "user_loss", "timm_resnet", "timm_vit"),
    ),
    "ActivenessAwareFineTuning": Entry(
        ft_callbacks.ActivenessAwareFineTuning,
        {"alpha": 0.7, "r": 0.05},
        make_module=tiny_classifier,
        make_data=small_digits_datamodule,
        yaml="activeness_aware_finetuning.yaml",
        worked=lambda cb, trainer: "backdoor/perturbed_loss" in trainer.callback_metrics,
        resume_overrides={"alpha": 0.5, "r": 0.1},
        monitor=("val_acc", "max"),
        metric="backdoor/perturbed_loss",
        wandb_keys={"backdoor/perturbed_loss": "scalar"},
        kinds=("dict", "model_output", "user_loss", "timm_resnet", "timm_vit"),
        # penalty mode recomputes the loss on the current micro-batch only (mode="clip" accumulates)
        setting_errors={"accumulate_grad_batches": "accumulate_grad_batches=2"},
    ),
    "RehearsalFeedback": Entry(
        ft_callbacks.RehearsalFeedback,
        {"log_every_n_steps": 1},
        make_module=tiny_mlp_classifier,
        make_data=rehearsal_datamodule,
        yaml="rehearsal_feedback.yaml",
        worked=lambda cb, trainer: int(trainer.datamodule.sampler.seen.sum()) > 0,
        resume_overrides={"log_every_n_steps": 5},
        trainer_kwargs={"use_distributed_sampler": False},
        group_data_priority=1,
        monitor=("val_acc", "max"),
        metric="rehearsal/cd_hit_rate_total",
        wandb_keys={
            "rehearsal/cd_hit_rate": "scalar",
            "rehearsal/cd_hit_rate_total": "scalar",
            "rehearsal/alpha_by_bin": "chart",
        },
        kinds=("dict", "model_output"),
        native_mid_epoch=True,
    ),
    "FLOWReweighting": Entry(
        ft_callbacks.FLOWReweighting,
        {"batch_size": 64},
        make_module=tiny_mlp_classifier,
        make_data=flow_datamodule,
        yaml="flow_reweighting.yaml",
        worked=lambda cb, trainer: trainer.lightning_module.flow_weighting is not None,
        resume_overrides={"batch_size": 8},
        monitor=("val_acc", "max"),
        metric="flow/tau",
        wandb_keys={"flow/tau": "scalar", "flow/mean_weight": "scalar"},
        kinds=("dict", "model_output"),
    ),
    "LearnedMaskPruning": Entry(
        ft_callbacks.LearnedMaskPruning,
        # an explicit total: the stopped run of the resume test is a shorter fit of the same schedule
        {"sparsity": 0.5, "gate_type": "hard_concrete", "total_steps": 12, "schedule_start": 0.0, "schedule_end": 0.5},
        make_module=tiny_classifier,
        make_data=small_digits_datamodule,
        yaml="learned_mask_pruning.yaml",
        worked=lambda cb, trainer: sum(cb.pruned.values()) > 0,
        resume_overrides={"gate_lr": 0.05},
        essential_change={"sparsity": 0.3},
        monitor=("val_acc", "max"),
        metric="prune/sparsity",
        # BatchNorm channels by default (conv nets); a ViT has none: its MLP and attention linears are gated
        kind_kwargs={"timm_vit": {"layer_types": ["linear"]}},
        wandb_keys={"prune/sparsity": "scalar", "prune/target_sparsity": "scalar", "prune/gate_scores": "histogram"},
        kinds=("dict", "model_output", "user_loss", "timm_resnet", "timm_vit"),
    ),
    "ReconstructiveNeuronPruning": Entry(
        ft_callbacks.ReconstructiveNeuronPruning,
        {"threshold": 0.99, "unlearn_epochs": 3, "mask_epochs": 3},
        make_module=tiny_classifier,
        make_data=small_digits_datamodule,
        yaml="reconstructive_neuron_pruning.yaml",
        worked=lambda cb, trainer: cb.done and cb.report["channels"] > 0,
        resume_overrides={"verbose": True, "progress_bar": False},
        essential_change={"threshold": 0.5},
        monitor=("val_acc", "max"),
        metric="rnp/pruned_channels",
        wandb_keys={"rnp/pruned_channels": "scalar", "rnp/masks": "histogram"},
        kinds=("dict", "model_output", "user_loss", "timm_resnet"),
        kind_errors={"timm_vit": "BatchNorm"},
    ),
}
