"""End-to-end backdoor demo: a BadNets/Blended-backdoored digits classifier, then vanilla fine-tuning vs TSBD.

The attacker trains a classifier on scikit-learn's digits (upsampled to 16x16) with 10% of the training images
poisoned (trigger + target label 0). The defender has 5% of the training split as clean data and fine-tunes with
Lightning, with or without the TSBD callbacks. Reported as in BackdoorBench: clean accuracy (C-ACC), attack success
rate (ASR) and robust accuracy (RA) on triggered non-target test images, and the defense effectiveness rating (DER).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.backdoor.activeness import ActivenessAwareFineTuning
from lightning_ft.backdoor.attacks import BadNets, Blended, PoisonedDataset, triggered_test_set
from lightning_ft.backdoor.callbacks import NeuronWeightChangeReinit
from lightning_ft.backdoor.functional import (
    defense_effectiveness_rating,
)
from lightning_ft.backdoor.rnp import ReconstructiveNeuronPruning
from lightning_ft.demos._common import cpu_trainer as _trainer
from lightning_ft.demos._common import prepare_demo_process
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier

__all__ = [
    "ATTACKS",
    "KINDS",
    "BackdoorDemoConfig",
    "BackdoorSetup",
    "StageTracker",
    "defend",
    "defend_all",
    "evaluate",
    "evaluate_state",
    "format_table",
    "main",
    "prepare",
    "run",
]

KINDS = ("no_defense", "vanilla_ft", "stage1_only", "stage1_ft", "tsbd_penalty", "tsbd_clip", "rnp", "rnp_ft")
ATTACKS = ("badnets", "blended")


@dataclass
class BackdoorDemoConfig:
    """Every knob of the demo; the defaults are what the method card reports."""

    attack: str = "badnets"
    arch: str = "bn_cnn"
    seed: int = 0
    image_size: int = 16
    test_fraction: float = 0.3
    poison_ratio: float = 0.1
    target: int = 0
    badnets_size: int = 3
    blended_alpha: float = 0.2
    attack_epochs: int = 30
    attack_lr: float = 0.05
    attack_batch_size: int = 64
    clean_fraction: float = 0.05
    finetune_epochs: int = 20
    finetune_lr: float = 0.01
    finetune_batch_size: int = 32
    neuron_ratio: float | str = "auto"
    subweight_ratio: float = 0.7
    lr_unlearn: float = 1e-3
    max_unlearn_epochs: int = 200
    alpha: float = 0.7
    r: float = 0.05
    clip_factor: float = 1.0
    rnp_threshold: float | str = "auto"
    kinds: tuple[str, ...] = field(default_factory=lambda: KINDS)

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"`attack` must be one of {ATTACKS}, got {self.attack!r}.")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"`kinds` must be a subset of {KINDS}, got unknown {sorted(unknown)}.")


@dataclass
class BackdoorSetup:
    """The data and the backdoored weights every defense starts from."""

    test_x: Tensor
    test_y: Tensor
    triggered_x: Tensor
    triggered_y: Tensor  # the true labels of the triggered (non-target) test images
    clean: TensorDataset
    backdoored_state: dict[str, Tensor]
    attack_seconds: float


ARCH_KWARGS: dict[str, dict[str, Any]] = {"test_vit": {"img_size": 16, "patch_size": 4}}
"""timm keyword arguments per architecture (a ViT on 16x16 digits: 4x4 patches)."""


def _classifier(config: BackdoorDemoConfig, **kwargs: Any) -> ImageClassifier:
    """The demo's classifier for ``config.arch`` (timm models with :data:`ARCH_KWARGS`)."""
    timm_kwargs = ARCH_KWARGS.get(config.arch)
    return ImageClassifier(arch=config.arch, seed=config.seed, timm_kwargs=timm_kwargs, **kwargs)


def _stack(dataset: Any) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def prepare(config: BackdoorDemoConfig) -> BackdoorSetup:
    """Split digits, poison the training split, train the backdoored classifier, pick the defender's clean set."""
    x, y = load_digits_tensors(config.image_size)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    n_test = int(len(y) * config.test_fraction)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    train = TensorDataset(x[train_idx], y[train_idx])
    attack = (
        BadNets(size=config.badnets_size)
        if config.attack == "badnets"
        else Blended(alpha=config.blended_alpha, seed=config.seed)
    )
    poisoned = PoisonedDataset(train, attack, ratio=config.poison_ratio, target=config.target, seed=config.seed)
    test = TensorDataset(x[test_idx], y[test_idx])
    triggered_x, _ = _stack(triggered_test_set(test, attack, target=config.target))
    non_target = y[test_idx] != config.target
    # the defender's clean data: a share of the training split, none of it poisoned
    n_clean = int(len(train) * config.clean_fraction)
    clean_idx = [i for i in range(len(train)) if not poisoned.is_poisoned(i)][:n_clean]
    clean = TensorDataset(x[train_idx][clean_idx], y[train_idx][clean_idx])

    pl.seed_everything(config.seed, verbose=False)
    module = _classifier(config, lr=config.attack_lr, weight_decay=5e-4)
    poisoned_x, poisoned_y = _stack(poisoned)
    loader = DataLoader(TensorDataset(poisoned_x, poisoned_y), batch_size=config.attack_batch_size, shuffle=True)
    start = time.perf_counter()
    _trainer(config.attack_epochs).fit(module, loader)
    return BackdoorSetup(
        test_x=x[test_idx],
        test_y=y[test_idx],
        triggered_x=triggered_x,
        triggered_y=y[test_idx][non_target],
        clean=clean,
        backdoored_state=copy.deepcopy(module.state_dict()),
        attack_seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(module: ImageClassifier, setup: BackdoorSetup, target: int = 0) -> dict[str, float]:
    """C-ACC, ASR and RA in eval mode; the module is handed back in train mode (Lightning keeps eval mode)."""
    module.eval()
    try:
        acc = (module(setup.test_x).argmax(-1) == setup.test_y).float().mean().item()
        pred = module(setup.triggered_x).argmax(-1)
    finally:
        module.train()
    return {
        "acc": acc,
        "asr": (pred == target).float().mean().item(),
        "ra": (pred == setup.triggered_y).float().mean().item(),
    }


def _stage_one(config: BackdoorDemoConfig) -> NeuronWeightChangeReinit:
    return NeuronWeightChangeReinit(
        neuron_ratio=config.neuron_ratio,
        subweight_ratio=config.subweight_ratio,
        lr_unlearn=config.lr_unlearn,
        max_unlearn_epochs=config.max_unlearn_epochs,
        progress_bar=False,
    )


class StageTracker(pl.Callback):
    """C-ACC and ASR at train start (after stage 1 when placed after the TSBD callbacks) and after every epoch."""

    def __init__(self, setup: BackdoorSetup, target: int = 0) -> None:
        self.setup, self.target = setup, target
        self.history: list[dict[str, float]] = []

    def _record(self, pl_module: pl.LightningModule, epoch: int) -> None:
        self.history.append({"epoch": epoch, **evaluate(pl_module, self.setup, self.target)})  # type: ignore[arg-type]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module, 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module, trainer.current_epoch + 1)


def defend(
    config: BackdoorDemoConfig,
    setup: BackdoorSetup,
    kind: str,
    extra_callbacks: list[pl.Callback] | None = None,
) -> dict[str, Any]:
    """Run one of :data:`KINDS` from the backdoored weights; returns its metrics, DER and timings.

    ``extra_callbacks`` (e.g. a :class:`StageTracker`) are added after the defense's callbacks in fine-tuning runs.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    pl.seed_everything(config.seed, verbose=False)
    module = _classifier(config, lr=config.finetune_lr)
    module.load_state_dict(setup.backdoored_state)
    row: dict[str, Any] = {"kind": kind, "attack": config.attack, "arch": config.arch, "seed": config.seed}
    start = time.perf_counter()
    if kind == "stage1_only":
        ordered = DataLoader(setup.clean, batch_size=config.finetune_batch_size, shuffle=False)
        row["stage1"] = _stage_one(config).apply(module, ordered)
        row["stage1_seconds"] = time.perf_counter() - start
    elif kind == "rnp":  # the official protocol: unlearn, recover masks, prune; no fine-tuning
        loader = DataLoader(setup.clean, batch_size=config.finetune_batch_size, shuffle=True)
        # finetune=False: an "auto" threshold is scored on the pruned model as it is (no fine-tuning follows)
        row["rnp"] = ReconstructiveNeuronPruning(threshold=config.rnp_threshold, finetune=False).apply(module, loader)
    elif kind == "rnp_ft":  # RNP, then the same fine-tuning as vanilla FT with the pruned channels held at 0
        loader = DataLoader(setup.clean, batch_size=config.finetune_batch_size, shuffle=True)
        rnp = ReconstructiveNeuronPruning(threshold=config.rnp_threshold)
        _trainer(config.finetune_epochs, [rnp, *(extra_callbacks or [])]).fit(module, loader)
        row["rnp"] = dict(rnp.report)
    elif kind != "no_defense":
        callbacks: list[pl.Callback] = []
        stage1 = _stage_one(config)
        if kind == "stage1_ft":  # the paper's "vanilla FT" ablation of stage 2
            callbacks = [stage1]
        elif kind == "tsbd_penalty":
            callbacks = [stage1, ActivenessAwareFineTuning(alpha=config.alpha, r=config.r)]
        elif kind == "tsbd_clip":
            callbacks = [stage1, ActivenessAwareFineTuning(mode="clip", clip_factor=config.clip_factor)]
        epochs = config.finetune_epochs + (0 if kind == "vanilla_ft" else 1)  # TSBD: range(ft_epoch + 1)
        loader = DataLoader(setup.clean, batch_size=config.finetune_batch_size, shuffle=True)
        _trainer(epochs, [*callbacks, *(extra_callbacks or [])]).fit(module, loader)
        if callbacks:
            row["stage1"] = dict(stage1.report)
            row["stage1_seconds"] = stage1.seconds
            row["nwc"] = None if stage1.nwc is None else stage1.nwc.tolist()
    row["seconds"] = time.perf_counter() - start
    row.update(evaluate(module, setup, config.target))
    return row


REUSE_RATIO = ("stage1_only", "stage1_ft", "tsbd_clip")
"""Kinds that take the neuron ratio the ``tsbd_penalty`` run chose under ``neuron_ratio="auto"`` (the calibration does
not depend on stage 2), instead of calibrating again."""


def defend_all(
    config: BackdoorDemoConfig, setup: BackdoorSetup, kinds: Sequence[str], verbose: bool = False
) -> list[dict[str, Any]]:
    """Run ``kinds`` (in that order in the result) from the same backdoored weights, as the benchmark does; rows carry
    DER against no defense. ``tsbd_penalty`` runs first, and the kinds of :data:`REUSE_RATIO` reuse the ratio it chose
    (so they show the stage 1 that TSBD used)."""
    before = evaluate_state(config, setup)
    rows: dict[str, dict[str, Any]] = {}
    chosen: float | None = None
    for kind in sorted(kinds, key=lambda k: (k in REUSE_RATIO, KINDS.index(k))):
        if verbose:
            print(f"defense: {kind} ...", flush=True)
        if kind == "no_defense":
            row = dict(before)
        else:
            ratio = chosen if kind in REUSE_RATIO and chosen is not None else config.neuron_ratio
            row = defend(replace(config, neuron_ratio=ratio), setup, kind)
        if kind == "tsbd_penalty":
            chosen = row["stage1"]["neuron_ratio"]
        row["der"] = defense_effectiveness_rating(before["asr"], row["asr"], before["acc"], row["acc"])
        rows[kind] = row
    return [rows[kind] for kind in kinds]


def run(config: BackdoorDemoConfig, verbose: bool = True) -> tuple[BackdoorSetup, list[dict[str, Any]]]:
    """Prepare the backdoored model and run every kind in ``config.kinds``; rows carry DER against no defense."""
    if verbose:
        print(f"training the {config.attack} backdoor into a {config.arch} ({config.attack_epochs} epochs) ...")
    setup = prepare(config)
    before = evaluate_state(config, setup)
    rows = []
    for kind in config.kinds:  # each kind on its own: every TSBD kind calibrates its ratio itself
        if verbose:
            print(f"defense: {kind} ...", flush=True)
        row = before if kind == "no_defense" else defend(config, setup, kind)
        row["der"] = defense_effectiveness_rating(before["asr"], row["asr"], before["acc"], row["acc"])
        rows.append(row)
    return setup, rows


def evaluate_state(config: BackdoorDemoConfig, setup: BackdoorSetup) -> dict[str, Any]:
    """The no-defense row: the backdoored model's metrics."""
    module = _classifier(config)
    module.load_state_dict(setup.backdoored_state)
    row: dict[str, Any] = {"kind": "no_defense", "attack": config.attack, "arch": config.arch, "seed": config.seed}
    return {**row, "seconds": 0.0, **evaluate(module, setup, config.target)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of one seed's runs."""
    lines = ["| defense | C-ACC | ASR | RA | DER | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['acc']:.3f} | {r['asr']:.3f} | {r['ra']:.3f} | {r['der']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(fast: bool = False, json_path: str | None = None) -> list[dict[str, Any]]:
    """Backdoor a digits classifier, run every defense of :data:`KINDS` and print the table (``fast``: shorter)."""
    prepare_demo_process()
    config = BackdoorDemoConfig()
    if fast:
        config.attack_epochs, config.finetune_epochs = 3, 2
    _, rows = run(config)
    print()
    print(format_table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps({"config": asdict(config), "runs": rows}))
    return rows
