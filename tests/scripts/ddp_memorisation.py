"""2-process CPU DDP run of MemorisationEarlyStopping (restore_best=True: the best-weights checkpoint is written by
rank 0 and loaded on every rank); every rank dumps its monitor state and parameters.

Usage: python tests/scripts/ddp_memorisation.py --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_ft.memorisation import (
    MemorisationEarlyStopping,
    exact_match,
    greedy_continuations,
    ngram_memorisation_score,
    token_accuracy,
)
from tests.helpers.data import pydoc_datamodule
from tests.helpers.models import tiny_lm_module


class Dump(pl.Callback):
    """At the end of fit: gather parameters across ranks and re-score the whole probe on this rank alone."""

    def __init__(self, out: Path, stopper: MemorisationEarlyStopping) -> None:
        self.out, self.stopper = out, stopper

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)  # (world, P)
        probe = self.stopper.probe
        gen = greedy_continuations(
            pl_module.model, probe.prefix_batch(torch.arange(len(probe))), probe.suffixes.shape[1]
        )
        ref = probe.suffixes
        full = {
            "ngram": ngram_memorisation_score(gen, ref, self.stopper.ngram_sizes).mean().item(),
            "exact": exact_match(gen, ref).mean().item(),
            "token_acc": token_accuracy(gen, ref).mean().item(),
        }
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "history": self.stopper.history,
            "stopped_step": self.stopper.stopped_step,
            "best": self.stopper.best,
            "best_model_path": self.stopper.best_model_path,
            "global_step": trainer.global_step,
            "probe_indices": self.stopper.state_dict()["probe_indices"],
            "param_max_diff": (gathered - gathered[0]).abs().max().item(),
            "full_probe_scores": full,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    stopper = MemorisationEarlyStopping(
        monitor="token_acc",
        max_rise=0.04,
        probe_size=12,
        prefix_len=16,
        suffix_len=16,
        ngram_sizes=(2, 3),
        batch_size=4,
        log_examples=0,
        verbose=False,
        restore_best=True,
        dirpath=str(args.out / "best"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[stopper, Dump(args.out, stopper)],
    )
    try:
        trainer.fit(tiny_lm_module(lr=1e-2), pydoc_datamodule(seq_len=32, n_train=24, batch_size=4))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a live group at interpreter exit can abort the process


if __name__ == "__main__":
    main()
