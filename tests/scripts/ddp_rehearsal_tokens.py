"""2-process CPU DDP fit of a causal LM with token-budget rehearsal (variable-length text, mix-cd): every rank dumps
the all-gather of its parameters, its sampler state and how many pool samples each of its batches rehearsed, and
the pool statistics the data module computed at fit start (a pass sharded over the ranks: each rank dumps how many
pool samples its model forwarded in it).

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
from tests.helpers.data import VariableLengthText, variable_length_chunks
from tests.helpers.models import TINY_LM

N_TRAIN = 24


def pool() -> list[dict[str, torch.Tensor]]:
    """The 40 variable-length pool chunks (the test recomputes their statistics in one process)."""
    return variable_length_chunks("pretrain", 40, seed=1)


def start_module() -> RehearsalLM:
    """The (seeded, identical on every rank) starting model."""
    pl.seed_everything(0, verbose=False)
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    module.correct_threshold = 0.04  # greedy accuracy of a random model: some chunks right, some not (mixed flags)
    return module


class CountStatisticsRows:
    """Counts the samples the model forwards in eval mode before training starts: the pool statistics pass."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows, self.active = 0, True
        module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        if self.active and not module.training:
            self.rows += int((args[0] if args else kwargs["input_ids"]).shape[0])


class Dump(pl.Callback):
    def __init__(self, out: Path, data: RehearsalDataModule, counter: CountStatisticsRows) -> None:
        self.out, self.data, self.replay_counts, self.counter = out, data, [], counter

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.counter.active = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.replay_counts.append(int((batch["sample_id"] >= N_TRAIN).sum()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        sampler = self.data.sampler
        state = sampler.state_dict()
        result = {
            "param_max_diff": (gathered - gathered[0]).abs().max().item(),
            "state": json.dumps(state, default=lambda v: v.tolist()),  # tensors as lists
            "global_step": trainer.global_step,
            "replay_counts": self.replay_counts,
            "seen": int(sampler.seen.sum()),
            "forgot": int(sampler.forgot.sum()),
            "statistics_rows": self.counter.rows,
            "pool_ids": self.data.pool_statistics.sample_ids.tolist(),
            "pool_loss": self.data.pool_statistics.loss.tolist(),
            "pool_correct": self.data.pool_statistics.correct.tolist(),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = start_module()
    counter = CountStatisticsRows(module)
    # token_budget_datamodule's set-up, with the pool statistics computed in the fit (a random model gets no chunk
    # right at the default threshold: lm_correct_threshold=0 counts every chunk as prior-correct)
    data = RehearsalDataModule(
        VariableLengthText(n=N_TRAIN, batch_size=4),
        pool(),
        strategy="mixcd",
        num_bins=4,
        budget="tokens",
        replay_ratio=0.25,
        task="causal_lm",
        lm_correct_threshold=0.0,
        statistics_batch_size=8,
    )
    trainer = cpu_trainer(
        2,
        [RehearsalFeedback(log_every_n_steps=1), Dump(args.out, data, counter)],
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
