"""2-process CPU DDP fit with DynamicBoostedAnnealing: every rank estimates the global gradient on its shard of the
general data; each rank dumps how far its ``ghat`` is from the one-process estimate over all the general data, the
cross-rank differences of ``ghat`` and of the parameters (all-gathered), and its step count.

Usage: python tests/scripts/ddp_dba.py --devices 2 --out DIR [--rank R]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_ft.optim import DynamicBoostedAnnealing, GlobalGradient, estimate_global_gradient
from tests.helpers.data import digits, small_digits_datamodule
from tests.helpers.models import tiny_mlp_classifier


def general_loader() -> DataLoader:
    """48 inverted digits with labels + 3, batch 16: 3 batches (ranks read 8 of each, in order)."""
    x, y = digits(8)
    return DataLoader(TensorDataset(1 - x[1000:1048], (y[1000:1048] + 3) % 10), batch_size=16)


def flat(ghat: GlobalGradient) -> torch.Tensor:
    return torch.cat([ghat.to_dense(n).flatten() for n in ghat.names])


class Dump(pl.Callback):
    def __init__(self, out: Path, dba: DynamicBoostedAnnealing, reference: torch.Tensor) -> None:
        self.out, self.dba, self.reference = out, dba, reference

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.dba.ghat is not None
        ghat = flat(self.dba.ghat)
        params = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered_ghat = trainer.strategy.all_gather(ghat)
        gathered_params = trainer.strategy.all_gather(params)
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "ghat_vs_one_process": ((ghat - self.reference).abs().max() / self.reference.abs().max()).item(),
            "ghat_rank_diff": (gathered_ghat - gathered_ghat[0]).abs().max().item(),
            "param_max_diff": (gathered_params - gathered_params[0]).abs().max().item(),
            "samples": self.dba.ghat.samples,
            "steps": self.dba.steps,
            "global_step": trainer.global_step,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=None, help="low-rank ghat (None: dense)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = tiny_mlp_classifier()
    # the one-process estimate at the same starting weights, over all the general data
    reference = flat(estimate_global_gradient(module, general_loader(), rank=args.rank))
    dba = DynamicBoostedAnnealing(general_loader(), general_batches=None, k0=0.5, gamma=0.5, rank=args.rank)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2,
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[dba, Dump(args.out, dba, reference)],
    )
    try:
        trainer.fit(module, small_digits_datamodule())
    finally:  # an undestroyed group can abort the interpreter at exit ("terminate called without an active exception")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
