"""2-process CPU DDP fit of one registry callback; every rank dumps its parameters' all-gather and callback state.

Usage: python tests/scripts/ddp_registry.py NAME --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.registry import REGISTRY


class Dump(pl.Callback):
    def __init__(self, out: Path, watched: pl.Callback) -> None:
        self.out, self.watched = out, watched

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        state = self.watched.state_dict()
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "param_max_diff": (gathered - gathered[0]).abs().max().item(),
            "state": json.dumps(state, sort_keys=True, default=repr),
            "global_step": trainer.global_step,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=sorted(REGISTRY))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    entry = REGISTRY[args.name]
    callback = entry.make()
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
        callbacks=[callback, Dump(args.out, callback)],
        **entry.trainer_kwargs,
    )
    try:
        trainer.fit(entry.make_module(), entry.make_data())
    finally:  # an undestroyed group can abort the interpreter at exit ("terminate called without an active exception")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
