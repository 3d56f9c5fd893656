"""2-process CPU DDP fit of a causal LM with token-budget rehearsal (variable-length text, mix-cd): every rank dumps
the all-gather of its parameters, its sampler state and how many pool samples each of its batches rehearsed.

Usage: python tests/scripts/ddp_rehearsal_tokens.py --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_ft.demos._common import cpu_trainer
from lightning_ft.demos.rehearsal_text import RehearsalLM
from lightning_ft.rehearsal import RehearsalDataModule, RehearsalFeedback
from tests.helpers.data import token_budget_datamodule
from tests.helpers.models import TINY_LM

N_TRAIN = 24


class Dump(pl.Callback):
    def __init__(self, out: Path, data: RehearsalDataModule) -> None:
        self.out, self.data, self.replay_counts = out, data, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.replay_counts.append(int((batch["sample_id"] >= N_TRAIN).sum()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        sampler = self.data.sampler
        state = sampler.state_dict()
        result = {
            "param_max_diff": (gathered - gathered[0]).abs().max().item(),
            "state": json.dumps({k: v.tolist() if hasattr(v, "tolist") else v for k, v in state.items()}),
            "global_step": trainer.global_step,
            "replay_counts": self.replay_counts,
            "seen": int(sampler.seen.sum()),
            "forgot": int(sampler.forgot.sum()),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    module.correct_threshold = 0.04  # greedy accuracy of a random model: some chunks right, some not (mixed flags)
    data = token_budget_datamodule(module, n_train=N_TRAIN)
    trainer = cpu_trainer(
        2,
        [RehearsalFeedback(log_every_n_steps=1), Dump(args.out, data)],
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False,
    )
    try:
        trainer.fit(module, data)
    finally:  # a process group left to the interpreter's exit can abort it ("terminate called ...", rc -6)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
