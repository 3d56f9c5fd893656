"""2-process CPU DDP fit with ``LearnedMaskPruning`` on shuffled, per-rank shards of digits.

A checker callback placed after the pruning callback records, at every training batch, the gates' keep masks the
batch uses (``on_train_batch_start``, after the callback set them) and the scores after the gate optimizer's step
(``on_train_batch_end``), and all-gathers both to measure the largest difference across ranks. The masks are kept
in the module (``make_permanent=False``) so the final gates can be compared too. Every rank dumps JSON to
``<out>/rank{r}.json``.

Usage: python tests/scripts/ddp_pruning.py --gate-type sigmoid|hard_concrete --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_ft.pruning import LearnedMaskPruning
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier


class Checker(pl.Callback):
    def __init__(self, out: Path, pruning: LearnedMaskPruning) -> None:
        self.out, self.pruning = out, pruning
        self.steps: list[int] = []
        self.masks: list[list[int] | None] = []  # the concatenated keep masks of each batch (None: no mask yet)
        self.mask_diffs: list[float] = []
        self.scores: list[list[float]] = []  # the concatenated scores after each optimizer step
        self.score_diffs: list[float] = []
        self.batch_fingerprints: list[float] = []
        self.initial_scores: list[float] = []

    def _scores(self) -> torch.Tensor:
        return torch.cat([g.gate.scores.detach().flatten() for g in self.pruning.gated])

    def _rank_diff(self, trainer: pl.Trainer, tensor: torch.Tensor) -> float:
        gathered = trainer.strategy.all_gather(tensor)  # (world, n)
        return (gathered - gathered[0]).abs().max().item()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial_scores = self._scores().tolist()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.steps.append(trainer.global_step)
        gates = [g.gate for g in self.pruning.gated]
        if gates[0].mask is None:
            assert all(g.mask is None for g in gates)
            self.masks.append(None)
            flat = torch.ones(sum(g.num_neurons for g in gates))
        else:
            flat = torch.cat([g.mask for g in gates]).float()
            self.masks.append(flat.int().tolist())
        self.mask_diffs.append(self._rank_diff(trainer, flat))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batch_fingerprints.append(float((batch[0].sum() + 1000 * batch[1].sum()).item()))
        scores = self._scores()
        self.scores.append(scores.tolist())
        self.score_diffs.append(self._rank_diff(trainer, scores))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "total": self.pruning._total,
            "steps": self.steps,
            "masks": self.masks,
            "mask_diffs": self.mask_diffs,
            "scores": self.scores,
            "score_diffs": self.score_diffs,
            "initial_scores": self.initial_scores,
            "batch_fingerprints": self.batch_fingerprints,
            "targets": [self.pruning.target_sparsity(s) for s in self.steps],
            "frozen": self.pruning._frozen is not None,
            "param_diff": self._rank_diff(trainer, flat),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gate-type", choices=["sigmoid", "hard_concrete"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    # 127 digits over 2 ranks, batch 32: 2 steps per epoch, 6 in all; the sparsity rises over steps 0-4
    pruning = LearnedMaskPruning(
        sparsity=0.5, gate_type=args.gate_type, schedule_start=0.0, schedule_end=0.75, make_permanent=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[pruning, Checker(args.out, pruning)],
    )
    try:
        # shuffle=True: the distributed sampler gives each rank a different shard of the training set
        trainer.fit(tiny_classifier(), small_digits_datamodule(shuffle=True))
    finally:
        # a process group left to interpreter shutdown can abort the process ("terminate called without an active
        # exception") after a green fit
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
