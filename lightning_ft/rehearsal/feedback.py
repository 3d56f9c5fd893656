"""RehearsalFeedback: which rehearsed samples the training forgot, fed back to the sampler's policy."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_ft._internal.logging import log_bar_chart
from lightning_ft._internal.strategies import check_strategy
from lightning_ft.rehearsal.datamodule import RehearsalDataModule
from lightning_ft.rehearsal.sampler import ReplayBatchSampler

__all__ = ["RehearsalFeedback"]


class RehearsalFeedback(Callback):
    """Feeds mix-cd: after every training batch, reports which rehearsed pool samples were forgotten.

    ``training_step`` must return ``{"loss": loss, "per_sample": {"sample_id": ids, "correct": correct,
    "loss": losses}}`` with one (detached) entry per sample of the batch: ``sample_id`` the ids the
    :class:`RehearsalDataModule` appends, ``correct`` whether the current model got the sample right (from the logits
    it already computed: no extra inference), ``loss`` optional. A rehearsed sample is *forgotten* when the starting
    model got it right and the current one does not. The flags come from ``training_step``'s own forward pass, in train
    mode (dropout active, batch-norm on batch statistics), not from an eval-mode pass. Under DDP the flags are
    all-gathered, so every rank's sampler holds the same rates; the sampler's count-weighted update makes them
    independent of how the observations split into steps and ranks. An epoch that rehearsed pool samples but got no
    pool sample id back (e.g. ``sample_id`` filled with the labels) raises a warning at its end.

    Logs (``pl_module.log``, so they reach ``trainer.callback_metrics`` and can be monitored) ``rehearsal/cd_hit_rate``
    (share of this step's rehearsed samples that were forgotten) and ``rehearsal/replay_loss`` (their mean loss, when
    given) every ``log_every_n_steps`` (the loggers receive them at the Trainer's own ``log_every_n_steps``), and at
    epoch ends the per-bin rates ``rehearsal/alpha_<k>`` and ``rehearsal/cd_hit_rate_total`` (and a bar chart
    ``rehearsal/alpha_by_bin`` on W&B, a table on TensorBoard). The sampler's state (position in the epoch, rates,
    counts) is checkpointed by the :class:`RehearsalDataModule` that owns it, or here for a sampler in your
    own DataLoader; either way a fit resumed mid-epoch continues with the next batch. A second ``fit`` with the same
    instance starts afresh unless it resumes from a checkpoint. FSDP, DeepSpeed and model-parallel strategies are
    refused at ``setup``.

    Args:
        log_every_n_steps: logging cadence of the per-step values.

    Example::

        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            logits = self(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            per_sample = {"sample_id": ids, "correct": logits.argmax(-1) == y, "loss": losses.detach()}
            return {"loss": losses.mean(), "per_sample": per_sample}
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"`log_every_n_steps` must be an integer >= 1, got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, until the sampler exists
        self._sampler: ReplayBatchSampler | None = None
        self._owned = False  # the sampler belongs to a RehearsalDataModule, which checkpoints it
        self._consumed = 0  # batches of the current epoch reported so far
        # this epoch's rehearsal: batches with pool samples drawn, and pool samples reported back (all-gathered)
        self._replay_batches = self._observed = 0

    def _find_sampler(self, trainer: pl.Trainer) -> ReplayBatchSampler:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, ReplayBatchSampler):
            raise ValueError(
                "RehearsalFeedback found no ReplayBatchSampler in the training DataLoader: train on a"
                " RehearsalDataModule (or a DataLoader with batch_sampler=CollateralDamageSampler(...) or"
                " ReplayBatchSampler(...))."
            )
        return sampler

    def _attach(self, trainer: pl.Trainer) -> ReplayBatchSampler:
        """The fit's sampler (a reload may bring a new loader), restored from the checkpoint's state once, unless
        its RehearsalDataModule owns it (the data module checkpoints and restores it, mid-epoch position included)."""
        sampler = self._find_sampler(trainer)
        data = trainer.datamodule
        self._owned = isinstance(data, RehearsalDataModule) and data.sampler is sampler
        state = None if self._pending is None else self._pending.get("sampler")
        if state is not None and not (self._owned and data.restored_sampler):  # type: ignore[union-attr]
            sampler.load_state_dict(state)  # your own loader, or a checkpoint of an older version
        self._pending = None
        self._sampler = sampler
        return sampler

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(
            trainer, "RehearsalFeedback", "feeds a sampler whose pool statistics come from the unwrapped module"
        )
        if stage == "fit":  # a new fit starts afresh; a checkpoint (restored after setup) brings its state back
            self._pending, self._sampler, self._owned, self._consumed = None, None, False, 0
            self._replay_batches = self._observed = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # also the first hook of a fit resumed mid-epoch (Lightning skips that epoch's on_train_epoch_start)
        self._attach(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self._attach(trainer)
        sampler.set_epoch(trainer.current_epoch)  # Lightning only sets the epoch on samplers, not batch samplers
        self._consumed = 0
        self._replay_batches = self._observed = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sampler = self._sampler if self._sampler is not None else self._attach(trainer)
        self._consumed = batch_idx + 1
        per_sample = outputs.get("per_sample") if isinstance(outputs, dict) else None
        if not isinstance(per_sample, dict) or "sample_id" not in per_sample or "correct" not in per_sample:
            raise ValueError(
                "RehearsalFeedback needs training_step to return {'loss': ..., 'per_sample': {'sample_id': ids,"
                " 'correct': bool per sample, 'loss': optional per-sample loss}}; got"
                f" {type(outputs).__name__} {sorted(outputs) if isinstance(outputs, dict) else ''}."
            )
        ids = torch.as_tensor(per_sample["sample_id"]).detach().flatten()
        correct = torch.as_tensor(per_sample["correct"]).detach().flatten().bool().to(ids.device)
        if correct.shape != ids.shape:
            raise ValueError(f"per_sample 'correct' has {correct.numel()} entries for {ids.numel()} sample ids.")
        log = trainer.global_step % self.log_every_n_steps == 0
        losses = per_sample.get("loss") if log else None
        if losses is not None:
            losses = torch.as_tensor(losses).detach().flatten()
            if losses.shape != ids.shape:
                raise ValueError(f"per_sample 'loss' has {losses.numel()} entries for {ids.numel()} sample ids.")
        if trainer.world_size > 1:
            if sampler.budget == "tokens":  # the ranks rehearse different numbers of samples: pad to the longest
                size = int(trainer.strategy.all_gather(torch.tensor(ids.numel(), device=ids.device)).max())
                pad = size - ids.numel()
                ids = torch.cat([ids, ids.new_full((pad,), -1)])  # -1: below every pool id, dropped below
                correct = torch.cat([correct, correct.new_zeros(pad)])
                losses = None if losses is None else torch.cat([losses, losses.new_zeros(pad)])
            ids = trainer.strategy.all_gather(ids).flatten()
            correct = trainer.strategy.all_gather(correct).flatten()
            if losses is not None:  # the logging steps are the same on every rank
                losses = trainer.strategy.all_gather(losses).flatten()
        # one host copy per step (the rates steer the next draws); the bookkeeping is NumPy on a few dozen values
        ids_np = ids.cpu().numpy().astype(np.int64, copy=False)
        replay = ids_np >= sampler.num_finetune
        positions = ids_np[replay] - sampler.num_finetune
        forgot = sampler.forgotten(positions, correct.cpu().numpy()[replay])
        sampler.update(positions, forgot)
        self._replay_batches += bool(sampler.drawn(batch_idx))  # this rank drew pool samples for this batch
        self._observed += positions.size
        if log and positions.size:  # all-gathered: the same value on every rank, no sync needed
            pl_module.log("rehearsal/cd_hit_rate", float(forgot.mean()), on_step=True, on_epoch=False)
            if losses is not None:
                replay_loss = float(losses.float().cpu().numpy()[replay].mean())
                pl_module.log("rehearsal/replay_loss", replay_loss, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sampler is not None and self._replay_batches and not self._observed:
            rank_zero_warn(
                # no epoch or count in the text: Python shows one warning per message, not one per epoch
                "RehearsalFeedback: an epoch rehearsed pool samples, but training_step's per_sample['sample_id']"
                " held no pool sample id (ids >="
                f" {self._sampler.num_finetune}): the feedback did nothing and mix-cd draws at random. Report the"
                " sample ids the RehearsalDataModule appends to every batch (the last element of a tuple batch, the"
                " 'sample_id' entry of a mapping), not the labels."
            )
        if self._sampler is not None and self._sampler.strategy == "mixcd":
            rates = [float(a) for a in self._sampler.alpha]
            metrics = {f"rehearsal/alpha_{k}": a for k, a in enumerate(rates)}
            metrics["rehearsal/cd_hit_rate_total"] = self._sampler.hit_rate
            # the same on every rank (all-gathered feedback); sync_dist only spares DDP's warning, it changes nothing
            sync = trainer.world_size > 1
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=sync)
            log_bar_chart(trainer, "rehearsal/alpha_by_bin", [f"bin {k}" for k in range(len(rates))], rates)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._sampler is None:
            return {} if self._pending is None else dict(self._pending)
        if self._owned:  # one copy per checkpoint: the RehearsalDataModule's
            return {"sampler_saved_by": "RehearsalDataModule"}
        return {"sampler": self._sampler.state_dict(consumed=self._consumed)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
