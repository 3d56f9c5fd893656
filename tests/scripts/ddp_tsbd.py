"""2-process CPU DDP fit with both TSBD callbacks (``tsbd(...)``) on shuffled, per-rank shards of digits.

A checker callback placed after the TSBD callbacks all-gathers the flattened parameters right after stage 1
(``on_train_start``) and after every stage-2 step (``on_train_batch_end``) and records the largest difference across
ranks. It also wraps ``trainer.strategy.reduce`` to measure how much the (local) perturbed gradient ``g2`` of the
penalty mode differs across ranks *before* it is averaged; ``--skip-g2-reduce`` makes that wrapper return ``g2``
unreduced (a negative control: the ranks must then drift apart). Every rank dumps JSON to ``<out>/rank{r}.json``.

Usage: python tests/scripts/ddp_tsbd.py --mode penalty|clip [--skip-g2-reduce] --devices 2 --out DIR
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

from lightning_ft.backdoor import ActivenessAwareFineTuning, NeuronWeightChangeReinit, tsbd
from tests.helpers.data import small_digits_datamodule
from tests.helpers.models import tiny_classifier, tiny_mlp_classifier


def _flat(pl_module: pl.LightningModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in pl_module.parameters()])


def _zeros(pl_module: pl.LightningModule, stage1: NeuronWeightChangeReinit) -> int:
    layers = stage1.layers(pl_module)
    return sum(int((layer.weight.detach() == 0).sum()) for layer in layers)


class Checker(pl.Callback):
    def __init__(
        self, out: Path, stage1: NeuronWeightChangeReinit, stage2: ActivenessAwareFineTuning, skip_g2_reduce: bool
    ) -> None:
        self.out, self.stage1, self.stage2, self.skip_g2_reduce = out, stage1, stage2, skip_g2_reduce
        self.stage1_diff = float("nan")
        self.step_diffs: list[float] = []
        self.g2_spreads: list[float] = []  # max |g2_rank - g2_rank0| before the mean over ranks
        self.batch_fingerprints: list[float] = []
        self.zeros_before = -1
        self.zeros_after_stage1 = -1
        self.zero_positions: list[int] = []

    def _rank_diff(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        gathered = trainer.strategy.all_gather(_flat(pl_module))  # (world, P)
        return (gathered - gathered[0]).abs().max().item()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        n_params = sum(p.numel() for p in pl_module.parameters())
        strategy, original = trainer.strategy, trainer.strategy.reduce

        def spying_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if not (isinstance(tensor, torch.Tensor) and tensor.numel() == n_params):
                return original(tensor, *args, **kwargs)  # anything else than the flat g2
            gathered = strategy.all_gather(tensor.detach())
            self.g2_spreads.append((gathered - gathered[0]).abs().max().item())
            return tensor if self.skip_g2_reduce else original(tensor, *args, **kwargs)

        strategy.reduce = spying_reduce  # the penalty mode looks it up at every step
        self.zeros_before = _zeros(pl_module, self.stage1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.stage1.done, "the checker must run after stage 1"
        self.stage1_diff = self._rank_diff(trainer, pl_module)
        self.zeros_after_stage1 = _zeros(pl_module, self.stage1)
        self.zero_positions = (_flat(pl_module) == 0).nonzero().flatten().tolist()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batch_fingerprints.append(float((batch[0].sum() + 1000 * batch[1].sum()).item()))
        self.step_diffs.append(self._rank_diff(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "stage1_diff": self.stage1_diff,
            "step_diffs": self.step_diffs,
            "checks": 1 + len(self.step_diffs),
            "g2_spreads": self.g2_spreads,
            "batch_fingerprints": self.batch_fingerprints,
            "report": self.stage1.report,
            "stage2_steps": self.stage2.steps,
            "zeros_before": self.zeros_before,
            "zeros_after_stage1": self.zeros_after_stage1,
            "zero_positions": self.zero_positions,
            "params": _flat(pl_module).tolist(),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["penalty", "clip"], required=True)
    parser.add_argument("--skip-g2-reduce", action="store_true")
    parser.add_argument("--model", choices=["bn_cnn", "mlp"], default="bn_cnn")
    parser.add_argument("--auto", action="store_true", help='neuron_ratio="auto" (calibrated on rank 0)')
    parser.add_argument(
        "--bad-labels",
        choices=["loader", "batches"],
        help="float labels in stage 1's clean data: a DataLoader (every rank unlearns its shard and fails) or a list of"
        " batches (cannot be sharded: rank 0 alone fails, its error is broadcast)",
    )
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    ratio: dict[str, Any] = (
        {"neuron_ratio": "auto", "calibration_epochs": 1, "calibration_candidates": [0.1, 0.3]}
        if args.auto
        else {"neuron_ratio": 0.3}
    )
    stage1, stage2 = tsbd(**ratio, lr_unlearn=1e-2, max_unlearn_epochs=5, progress_bar=False, mode=args.mode)
    assert isinstance(stage1, NeuronWeightChangeReinit) and isinstance(stage2, ActivenessAwareFineTuning)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[stage1, stage2, Checker(args.out, stage1, stage2, args.skip_g2_reduce)],
    )
    try:
        # shuffle=True: the distributed sampler gives each rank a different shard of the training set
        datamodule = small_digits_datamodule(shuffle=True)
        if args.bad_labels:
            from torch.utils.data import DataLoader, TensorDataset

            bad = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), torch.rand(32)), batch_size=16)  # float labels
            stage1.dataloader = bad if args.bad_labels == "loader" else list(bad)  # type: ignore[assignment]
        trainer.fit(tiny_classifier() if args.model == "bn_cnn" else tiny_mlp_classifier(), datamodule)
    except ValueError as error:  # every rank must fail (rank 0's error broadcast), none may hang in the broadcast
        (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"error": str(error)}))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
