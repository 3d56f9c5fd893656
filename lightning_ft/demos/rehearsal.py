"""End-to-end rehearsal demo: fine-tuning on a shifted digits task forgets the original one; rehearsal keeps it.

An MLP learns task A (scikit-learn digits, 8x8), then fine-tunes on task B (inverted digits, labels shifted by 3)
with no rehearsal, with FLOW weighting, or with a :class:`~lightning_ft.rehearsal.RehearsalDataModule` mixing a few
task-A samples into every batch (mix-cd or a baseline strategy). Reported: task-A accuracy after fine-tuning
(retention), task-B accuracy, and the share of rehearsed samples that were collateral damage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.demos._common import cpu_trainer, prepare_demo_process
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import FLOWReweighting, RehearsalDataModule, RehearsalFeedback
from lightning_ft.rehearsal.flow import FLOWWeighting
from lightning_ft.rehearsal.statistics import ReferenceStatistics, WithSampleIds

__all__ = [
    "KINDS",
    "STRATEGY_OF",
    "FLOWClassifier",
    "RehearsalDemoConfig",
    "finetune",
    "format_table",
    "main",
    "pretrain",
]

KINDS = (
    "no_rehearsal",
    "flow",
    "random",
    "random_prior_correct",
    "loss_priority",
    "mixcd",
    "mixcd_class",
    "flow_mixcd",
)
STRATEGY_OF = {
    "random": "random",
    "random_prior_correct": "random_prior_correct",
    "loss_priority": "loss_priority",
    "mixcd": "mixcd",
    "mixcd_class": "mixcd",  # bins of reference loss x class label
    "flow_mixcd": "mixcd",
}


@dataclass
class RehearsalDemoConfig:
    """Every knob of the demo."""

    seed: int = 0
    n_train: int = 1200
    n_task_b: int = 600
    label_shift: int = 3
    pretrain_epochs: int = 30
    finetune_epochs: int = 15
    lr: float = 0.05
    batch_size: int = 32
    replay_per_step: int = 2
    class_bins: int = 3  # mixcd_class: reference-loss bins per class
    kinds: tuple[str, ...] = field(default_factory=lambda: KINDS)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"`kinds` must be a subset of {KINDS}, got unknown {sorted(unknown)}.")


class FLOWClassifier(ImageClassifier):
    """:class:`ImageClassifier` whose training loss on ``(x, y, sample_id)`` batches is FLOW-weighted
    (``self.flow_loss``), returning the per-sample outputs :class:`~lightning_ft.rehearsal.RehearsalFeedback` reads.

    FLOW + rehearsal needs nothing more: :class:`~lightning_ft.rehearsal.FLOWReweighting` on a
    :class:`~lightning_ft.rehearsal.RehearsalDataModule` weights the fine-tuning samples only, the rehearsed pool
    samples keep weight 1.
    """

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, ids = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = self.flow_loss(losses, ids)
        self.log("train_loss", loss, prog_bar=True)
        per_sample = {"sample_id": ids, "correct": logits.detach().argmax(-1) == y, "loss": losses.detach()}
        return {"loss": loss, "per_sample": per_sample}


# the rehearsal sampler shards the fine-tuning data itself
_trainer = partial(cpu_trainer, use_distributed_sampler=False)


@torch.no_grad()
def _accuracy(module: ImageClassifier, x: Tensor, y: Tensor) -> float:
    module.eval()
    try:
        return (module(x).argmax(-1) == y).float().mean().item()
    finally:
        module.train()  # Lightning keeps a module's eval mode through a later fit()


def _data(config: RehearsalDemoConfig) -> dict[str, Any]:
    x, y = load_digits_tensors(8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    train, test = perm[: config.n_train], perm[config.n_train :]
    xb, yb = 1 - x, (y + config.label_shift) % 10
    b_idx = train[: config.n_task_b]
    return {
        "task_a": TensorDataset(x[train], y[train]),
        "task_b": TensorDataset(xb[b_idx], yb[b_idx]),
        "test_a": (x[test], y[test]),
        "test_b": (xb[test], yb[test]),
    }


def pretrain(config: RehearsalDemoConfig, data: dict[str, Any]) -> dict[str, Tensor]:
    """Train the task-A model; returns its state dict."""
    pl.seed_everything(config.seed, verbose=False)
    module = ImageClassifier(arch="mlp", lr=config.lr, seed=config.seed)
    loader = DataLoader(data["task_a"], batch_size=config.batch_size, shuffle=True)
    _trainer(config.pretrain_epochs).fit(module, loader)
    return {k: v.clone() for k, v in module.state_dict().items()}


def finetune(config: RehearsalDemoConfig, data: dict[str, Any], state: dict[str, Tensor], kind: str) -> dict[str, Any]:
    """Fine-tune the task-A model on task B with one of :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    pl.seed_everything(config.seed, verbose=False)
    flow = kind.startswith("flow")
    module = (FLOWClassifier if flow else ImageClassifier)(arch="mlp", lr=config.lr, seed=config.seed)
    module.load_state_dict(state)
    row: dict[str, Any] = {"kind": kind, "seed": config.seed}
    start = time.perf_counter()
    inner = pl.LightningDataModule.from_datasets(train_dataset=data["task_b"], batch_size=config.batch_size)
    if kind == "flow":  # FLOW set up by hand: the reference pass before the fit
        task_b = WithSampleIds(data["task_b"])
        module.flow_weighting = FLOWWeighting(ReferenceStatistics.compute(module, DataLoader(task_b, batch_size=256)))
        _trainer(config.finetune_epochs).fit(module, DataLoader(task_b, batch_size=config.batch_size, shuffle=True))
    elif kind == "no_rehearsal":
        _trainer(config.finetune_epochs).fit(module, inner)
    else:
        callbacks: list[pl.Callback] = [RehearsalFeedback()]
        if flow:  # FLOW + rehearsal: FLOW weights the fine-tuning samples, rehearsed pool samples keep weight 1
            callbacks.append(FLOWReweighting(samples="finetune"))
        groups = data["task_a"].tensors[1].tolist() if kind == "mixcd_class" else None
        mixed = RehearsalDataModule(
            inner,
            data["task_a"],
            strategy=STRATEGY_OF[kind],
            replay_per_step=config.replay_per_step,
            num_bins=config.class_bins if groups else 10,
            pool_groups=groups,
            seed=config.seed,
        )
        _trainer(config.finetune_epochs, callbacks).fit(module, mixed)
        assert mixed.sampler is not None
        row["cd_hit_rate"] = mixed.sampler.hit_rate
    if flow:
        assert module.flow_weighting is not None
        row["tau"] = module.flow_weighting.tau
    row["seconds"] = time.perf_counter() - start
    row["task_a"] = _accuracy(module, *data["test_a"])
    row["task_b"] = _accuracy(module, *data["test_b"])
    return row


def format_table(rows: list[dict[str, Any]], before: float) -> str:
    """Markdown table of one seed's runs."""
    lines = [
        f"task-A accuracy before fine-tuning: {before:.3f}\n",
        "| run | task-A acc (retention) | task-B acc | rehearsed samples that were forgotten | time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        hit = f"{r['cd_hit_rate']:.3f}" if "cd_hit_rate" in r else ""
        lines.append(f"| {r['kind']} | {r['task_a']:.3f} | {r['task_b']:.3f} | {hit} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(fast: bool = False, json_path: str | None = None) -> list[dict[str, Any]]:
    """Run every kind of :data:`KINDS` for one seed and print the table (``fast``: fewer epochs)."""
    prepare_demo_process()
    config = RehearsalDemoConfig()
    if fast:
        config.pretrain_epochs, config.finetune_epochs = 3, 2
    data = _data(config)
    print(f"training task A ({config.pretrain_epochs} epochs) ...", flush=True)
    state = pretrain(config, data)
    base = ImageClassifier(arch="mlp", lr=config.lr, seed=config.seed)
    base.load_state_dict(state)
    before = _accuracy(base, *data["test_a"])
    rows = []
    for kind in config.kinds:
        print(f"fine-tuning on task B: {kind} ...", flush=True)
        rows.append(finetune(config, data, state, kind))
    print()
    print(format_table(rows, before))
    if json_path:
        Path(json_path).write_text(json.dumps({"config": asdict(config), "before": before, "runs": rows}))
    return rows
