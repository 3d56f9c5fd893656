"""Lightning callbacks: memorisation monitoring and memorisation-based early stopping."""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft._internal.distributed import gather_uneven, shard_indices
from lightning_ft._internal.logging import log_scalars, log_table
from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.offline import show_progress
from lightning_ft._internal.resume import check_resumed_arguments, restore_legacy_state
from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.memorisation.functional import Match, teacher_forced_accuracy, validate_ngram_sizes
from lightning_ft.memorisation.generation import (
    check_causal_lm,
    greedy_continuations,
    left_pad,
    supports_kv_cache,
)
from lightning_ft.memorisation.metrics import MemorisationScore
from lightning_ft.memorisation.probe import Probe, Split, build_probe

__all__ = ["MemorisationEarlyStopping", "MemorisationMonitor", "find_causal_lm"]

_KEYS = ("ngram", "exact", "token_acc")
_PROBE_CHANGED = "its baseline and history are not comparable with new checks"


def find_causal_lm(pl_module: nn.Module, model_attr: str | None = None) -> nn.Module:
    """The causal LM inside ``pl_module``: the attribute at dotted path ``model_attr``, else the only submodule with
    a Hugging Face LM head, else ``pl_module`` itself (its forward must return logits)."""
    if model_attr:
        model: Any = pl_module
        for part in model_attr.split("."):
            if not hasattr(model, part):
                raise ValueError(f"`model_attr={model_attr!r}`: {type(model).__name__} has no attribute {part!r}.")
            model = getattr(model, part)
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model_attr={model_attr!r}` is a {type(model).__name__}, not an nn.Module.")
        check_causal_lm(model)
        return model
    candidates = [
        (name, m)
        for name, m in pl_module.named_modules()
        if hasattr(m, "config") and callable(getattr(m, "get_output_embeddings", None))
    ]
    # keep outermost models only (a GPT2LMHeadModel contains no other PreTrainedModel with a head, but be safe)
    outer = [(n, m) for n, m in candidates if not any(n != o and n.startswith(o + ".") for o, _ in candidates if o)]
    if len(outer) > 1:
        names = [n or "<the LightningModule>" for n, _ in outer]
        raise ValueError(f"found several language models {names}; pass `model_attr` naming the one to probe.")
    model = outer[0][1] if outer else pl_module
    check_causal_lm(model)
    return model


class MemorisationMonitor(Callback):
    """Measure verbatim and n-gram memorisation of training samples during fine-tuning.

    A fixed probe of training samples (seeded, drawn once) is split into prompt and true continuation; at fit start
    and then every ``check_every_n_epochs`` epochs and/or ``check_every_n_steps`` optimizer steps the model greedily
    continues each prompt (batched, KV cache) and the callback logs

    * ``mem/ngram``: n-gram memorisation score (Slack & Al Moubayed 2025), the early signal;
    * ``mem/exact``: rate of exactly reproduced continuations (k-extractable, Carlini et al. 2022);
    * ``mem/token_acc``: fraction of continuation tokens reproduced (Pythia's memorisation score);

    plus a table of the most memorised probe samples when the logger is W&B (TensorBoard: markdown text). Under DDP
    the probe is sharded across ranks and the scores are reduced, so every rank holds the same values.

    The state (probe indices, baseline, history) is stored under the class name, so a resume finds it whatever
    cadence or logging arguments changed; the arguments that define the measurement (``probe_size``, ``prefix_len``,
    ``suffix_len``, ``ngram_sizes``, ``match``, ``split``, ``seed``) must stay the same (else ``ValueError``). The
    step-0 baseline is never measured after a resume. Each ``fit`` starts afresh unless it resumes from a checkpoint.

    Args:
        probe_size: number of training samples probed (fewer if the training set is smaller).
        prefix_len: prompt tokens (``split="prefix"``); with ``split="labels"`` the prompt is truncated to its last
            ``prefix_len`` tokens, or kept whole when None.
        suffix_len: continuation tokens generated and compared; must be ``>= max(ngram_sizes)``.
        ngram_sizes: n-gram sizes of the score.
        match: ``"bag"`` (clipped n-gram counts) or ``"positional"``.
        split: ``"prefix"`` (domain adaptation: raw text) or ``"labels"`` (instruction tuning: the prompt is the part
            whose labels are ``ignore_index``).
        check_every_n_epochs: check at the end of every n-th training epoch (None: never at epoch ends).
        check_every_n_steps: check every n optimizer steps (None: never by steps).
        check_at_start: measure the starting model before the first step (the baseline of relative rules).
        batch_size: probe prompts decoded together.
        seed: seed of the probe sample.
        model_attr: dotted attribute path of the causal LM inside the LightningModule (default: found
            automatically; see :func:`find_causal_lm`).
        input_key: key of the token ids when dataset samples are mappings.
        labels_key: key of the labels (``split="labels"``).
        ignore_index: label value of unsupervised (prompt) positions.
        short_samples: ``"error"`` (default) or ``"skip"`` for samples too short for the split.
        log_examples: rows in the table of most-memorised samples (0 disables it).
        progress_bar: a progress bar over the probe batches on rank 0 during each check; None (default) follows the
            Trainer's ``enable_progress_bar``.
        tf_every_n_steps: also log ``mem/tf_acc``, the teacher-forced proxy (one forward pass over prompt + true
            suffix instead of ``suffix_len`` decode steps), every n optimizer steps (None: off). Cheap and dense, but
            not greedy extraction: a greedily extracted sample has ``tf_acc = 1``, not the converse.

    Example::

        trainer = Trainer(callbacks=[MemorisationMonitor(probe_size=256, prefix_len=32, suffix_len=32)])
        trainer.fit(model, datamodule)  # logs mem/ngram, mem/exact, mem/token_acc every epoch

    Reference: Slack & Al Moubayed, "Early Detection and Reduction of Memorisation for Domain Adaptation and
    Instruction Tuning", TACL 2025, arXiv:2510.11372.
    """

    def __init__(
        self,
        probe_size: int = 512,
        prefix_len: int | None = 32,
        suffix_len: int = 32,
        ngram_sizes: list[int] | tuple[int, ...] = (4, 5, 6),
        match: Match = "bag",
        split: Split = "prefix",
        check_every_n_epochs: int | None = 1,
        check_every_n_steps: int | None = None,
        check_at_start: bool = True,
        batch_size: int = 64,
        seed: int = 0,
        model_attr: str | None = None,
        input_key: str = "input_ids",
        labels_key: str = "labels",
        ignore_index: int = -100,
        short_samples: Literal["error", "skip"] = "error",
        log_examples: int = 8,
        progress_bar: bool | None = None,
        tf_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        check_int("probe_size", probe_size)
        check_int("suffix_len", suffix_len)
        check_int("batch_size", batch_size)
        check_int("check_every_n_epochs", check_every_n_epochs, allow_none=True)
        check_int("check_every_n_steps", check_every_n_steps, allow_none=True)
        check_int("tf_every_n_steps", tf_every_n_steps, allow_none=True)
        self.ngram_sizes = validate_ngram_sizes(ngram_sizes, "ngram_sizes")
        if suffix_len < max(self.ngram_sizes):
            raise ValueError(
                f"`suffix_len={suffix_len}` is shorter than the largest n-gram size {max(self.ngram_sizes)}; raise"
                " `suffix_len` or lower `ngram_sizes`."
            )
        if split not in ("prefix", "labels"):
            raise ValueError(f'`split` must be "prefix" or "labels", got {split!r}.')
        if split == "prefix":
            if prefix_len is None:
                raise ValueError('`prefix_len` is required with split="prefix"; e.g. prefix_len=32.')
            check_int("prefix_len", prefix_len)
        elif prefix_len is not None:
            check_int("prefix_len", prefix_len)
        if match not in ("bag", "positional"):
            raise ValueError(f'`match` must be "bag" or "positional", got {match!r}.')
        if short_samples not in ("error", "skip"):
            raise ValueError(f'`short_samples` must be "error" or "skip", got {short_samples!r}.')
        if check_every_n_epochs is None and check_every_n_steps is None and not check_at_start:
            raise ValueError("the monitor would never run: set `check_every_n_epochs` or `check_every_n_steps`.")
        check_int("log_examples", log_examples, minimum=0)
        self.probe_size = probe_size
        self.prefix_len = prefix_len
        self.suffix_len = suffix_len
        self.match: Match = match
        self.split: Split = split
        self.check_every_n_epochs = check_every_n_epochs
        self.check_every_n_steps = check_every_n_steps
        self.check_at_start = check_at_start
        self.batch_size = batch_size
        self.seed = seed
        self.model_attr = model_attr
        self.input_key = input_key
        self.labels_key = labels_key
        self.ignore_index = ignore_index
        self.short_samples: Literal["error", "skip"] = short_samples
        self.log_examples = log_examples
        self.progress_bar = progress_bar
        self.tf_every_n_steps = tf_every_n_steps

        self._metric: MemorisationScore | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget everything measured: a fresh instance (called again at the start of every fit)."""
        self.probe: Probe | None = None
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self._probe_indices: list[int] | None = None
        self._last_checked_step = -1
        self.tf_history: list[dict[str, float]] = []
        self.check_seconds: list[float] = []  # wall time of each check in this process (not checkpointed)

    @property
    @override
    def state_key(self) -> str:
        # the class name only, so the state is found again whatever arguments changed between a run and its resume
        # (cadence, logging, ...); what the arguments that define the measurement must keep is checked in
        # load_state_dict. Lightning refuses two instances of one class in a Trainer (they would log the same keys).
        return type(self).__qualname__

    def _probe_identity(self) -> dict[str, Any]:
        """The arguments that define what is measured: a resume must keep them (checked in ``load_state_dict``)."""
        return {
            "probe_size": self.probe_size,
            "prefix_len": self.prefix_len,
            "suffix_len": self.suffix_len,
            "ngram_sizes": list(self.ngram_sizes),
            "match": self.match,
            "split": self.split,
            "seed": self.seed,
        }

    @property
    def latest(self) -> dict[str, float] | None:
        """The most recent check: ``{"step", "epoch", "ngram", "exact", "token_acc"}``."""
        return self.history[-1] if self.history else None

    # ----------------------------------------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__, "generates with the unwrapped model")
        find_causal_lm(pl_module, self.model_attr)  # fail early on a module that cannot generate
        self._metric = MemorisationScore(self.ngram_sizes, self.match)
        # a reused instance starts like a fresh one; a checkpoint's state (ckpt_path) is loaded after setup
        self._reset()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written before the state key became the class name store the state under
        # "<class name>{<arguments>}": load it from there (Lightning only looks up the current key)
        restore_legacy_state(self, checkpoint, self._probe_identity(), _PROBE_CHANGED)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None:
            self.probe = build_probe(
                _train_dataset(trainer),
                self.probe_size,
                self.prefix_len,
                self.suffix_len,
                split=self.split,
                seed=self.seed,
                indices=self._probe_indices,
                input_key=self.input_key,
                labels_key=self.labels_key,
                ignore_index=self.ignore_index,
                short_samples=self.short_samples,
            )
            self._probe_indices = self.probe.indices.tolist()
        if self.check_at_start and self.baseline is None:
            if trainer.global_step > 0:  # resumed from a checkpoint without a baseline: the weights are fine-tuned
                self._baseline_missing(trainer)
                return
            values = self._check(trainer, pl_module)
            self.baseline = {k: values[k] for k in _KEYS}
            log_scalars(trainer, {f"mem/{k}": values[k] for k in _KEYS})
            log_scalars(trainer, {f"mem/{k}_baseline": values[k] for k in _KEYS})

    def _baseline_missing(self, trainer: pl.Trainer) -> None:
        """Resumed at step > 0 without a step-0 baseline in the checkpoint: never measure it on fine-tuned weights."""
        rank_zero_warn(
            f"{type(self).__name__}: resuming at step {trainer.global_step} from a checkpoint whose state has no"
            " step-0 baseline (it was written without this callback, with check_at_start=False, or by an older"
            " version); the baseline is not measured on the fine-tuned weights: mem/*_baseline is not logged."
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._tf_due(step):
            tf_acc = self.teacher_forced_accuracy(trainer, pl_module)
            self.tf_history.append({"step": step, "epoch": trainer.current_epoch, "tf_acc": tf_acc})
            pl_module.log("mem/tf_acc", tf_acc, on_step=True, on_epoch=False, logger=False)
            log_scalars(trainer, {"mem/tf_acc": tf_acc})
        n = self.check_every_n_steps
        if n is None or step == 0 or step % n != 0 or step == self._last_checked_step:
            return
        values = self._check(trainer, pl_module)
        self._log(trainer, pl_module, values, on_step=True)
        self._after_check(trainer, pl_module, values)

    def _tf_due(self, step: int) -> bool:
        n = self.tf_every_n_steps
        already = bool(self.tf_history) and self.tf_history[-1]["step"] == step  # accumulation: same step again
        return n is not None and step > 0 and step % n == 0 and not already

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.check_every_n_epochs
        if n is None or (trainer.current_epoch + 1) % n != 0 or trainer.global_step == self._last_checked_step:
            return
        values = self._check(trainer, pl_module)
        self._log(trainer, pl_module, values, on_step=False)
        self._after_check(trainer, pl_module, values)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float], on_step: bool) -> None:
        # callback_metrics (for EarlyStopping / ModelCheckpoint / the progress bar) through pl_module.log, the loggers
        # directly at this step (pl_module.log would forward step values only every `log_every_n_steps`)
        for key in _KEYS:
            pl_module.log(f"mem/{key}", values[key], on_step=on_step, on_epoch=not on_step, logger=False)
        log_scalars(trainer, {f"mem/{k}": values[k] for k in _KEYS})

    def _after_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        """Hook for subclasses, called on every rank after each check (not the start check)."""

    # ----------------------------------------------------------------------------------------------- the check
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], Tensor]:
        """Score this rank's probe shard, reduce over ranks; returns the means and this shard's per-sample scores.

        Must be called on every rank (it synchronises).
        """
        if self.probe is None or self._metric is None:
            raise RuntimeError("the probe is not built yet; evaluate() is available from on_train_start on.")
        model = find_causal_lm(pl_module, self.model_attr)
        rows = shard_indices(len(self.probe), trainer.global_rank, trainer.world_size)
        metric = self._metric.to(pl_module.device)
        metric.reset()
        per_sample = torch.zeros((rows.numel(), 3), device=pl_module.device)
        generated = torch.zeros((rows.numel(), self.suffix_len), dtype=torch.long, device=pl_module.device)
        if rows.numel() > 0:
            with trainer.precision_plugin.forward_context():
                generated = greedy_continuations(
                    model,
                    self.probe.prefix_batch(rows),
                    self.suffix_len,
                    batch_size=self.batch_size,
                    progress=show_progress(trainer, self.progress_bar),
                )
            metric.update(generated, self.probe.suffixes[rows].to(generated.device))
            assert metric.last_scores is not None
            per_sample = metric.last_scores
        values = {k: float(v) for k, v in metric.compute().items()}  # synced: identical on every rank
        metric.reset()
        self._maybe_log_examples(trainer, rows, per_sample, generated)
        return values, per_sample

    def teacher_forced_accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Mean teacher-forced suffix accuracy over the probe (sharded, summed over ranks); call on every rank."""
        if self.probe is None:
            raise RuntimeError("the probe is not built yet; available from on_train_start on.")
        model = find_causal_lm(pl_module, self.model_attr)
        rows = shard_indices(len(self.probe), trainer.global_rank, trainer.world_size)
        total = torch.zeros(2, device=pl_module.device)  # (sum of accuracies, count)
        hf_model = supports_kv_cache(model)
        with torch.no_grad(), eval_mode(model), trainer.precision_plugin.forward_context():
            for start in range(0, rows.numel(), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                prefixes = [self.probe.prefixes[int(i)] for i in chunk]
                ids, mask = left_pad(prefixes, 0)
                suffix = self.probe.suffixes[chunk]
                ids = torch.cat([ids, suffix], 1).to(pl_module.device)
                mask = torch.cat([mask, torch.ones_like(suffix)], 1).to(pl_module.device)
                padded = not bool(mask.all())
                position_ids = (mask.cumsum(-1) - 1).clamp_min(0) if padded else None
                if hf_model:
                    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=position_ids)
                elif padded:
                    raise ValueError("prompts of different lengths need a Hugging Face causal LM (attention mask).")
                else:
                    out = model(ids)
                logits = out if isinstance(out, Tensor) else out.logits
                width = suffix.shape[1]
                predicted = logits[:, -width - 1 : -1]  # position t predicts token t + 1
                acc = teacher_forced_accuracy(predicted, suffix.to(pl_module.device))
                total += torch.stack([acc.sum(), acc.new_tensor(float(acc.numel()))])
        total = trainer.strategy.reduce(total, reduce_op="sum")
        return float(total[0] / total[1].clamp_min(1))

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        values, _ = self.evaluate(trainer, pl_module)
        self.check_seconds.append(time.perf_counter() - start)
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, **values}
        self.history.append(record)
        self._last_checked_step = trainer.global_step
        return record

    def _maybe_log_examples(self, trainer: pl.Trainer, rows: Tensor, per_sample: Tensor, generated: Tensor) -> None:
        if not self.log_examples or not trainer.loggers:  # same on every rank: the gather below is a collective
            return
        assert self.probe is not None
        n_total = len(self.probe)
        scores = gather_uneven(per_sample, n_total, trainer.world_size)
        gens = gather_uneven(generated, n_total, trainer.world_size)
        if trainer.global_rank != 0:
            return
        tokenizer = _find_tokenizer(trainer)
        top = torch.argsort(scores[:, 0], descending=True)[: self.log_examples].tolist()

        def text(ids: Tensor) -> str:
            return tokenizer.decode(ids.tolist()) if tokenizer is not None else " ".join(map(str, ids.tolist()))

        table = [
            [
                int(self.probe.indices[i]),
                float(scores[i, 0]),
                float(scores[i, 2]),
                text(self.probe.prefixes[i]),
                text(self.probe.suffixes[i]),
                text(gens[i].cpu()),
            ]
            for i in top
        ]
        columns = ["index", "ngram", "token_acc", "prompt", "reference", "generation"]
        log_table(trainer, "mem/examples", columns, table)

    # ----------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": self._probe_identity(),
            "probe_indices": self._probe_indices,
            "seed": self.seed,
            "baseline": self.baseline,
            "history": list(self.history),
            "last_checked_step": self._last_checked_step,
            "tf_history": list(self.tf_history),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # older checkpoints have no "probe" entry: accepted
        check_resumed_arguments(self, state_dict.get("probe"), self._probe_identity(), _PROBE_CHANGED)
        self._probe_indices = state_dict.get("probe_indices")
        self.baseline = state_dict.get("baseline")
        self.history = list(state_dict.get("history", []))
        self._last_checked_step = state_dict.get("last_checked_step", -1)
        self.tf_history = list(state_dict.get("tf_history", []))
        self.probe = None  # rebuilt from the saved indices at train start


def _train_dataset(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values())) if len(loader) == 1 else None
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            "MemorisationMonitor needs one map-style training dataset (train_dataloader().dataset with __len__ and"
            " __getitem__) to draw its probe from; iterable or multiple training loaders are not supported."
        )
    return dataset


def _find_tokenizer(trainer: pl.Trainer) -> Any:
    for owner in (trainer.lightning_module, trainer.datamodule):
        tokenizer = getattr(owner, "tokenizer", None)
        if tokenizer is not None and callable(getattr(tokenizer, "decode", None)):
            return tokenizer
    return None


class MemorisationEarlyStopping(MemorisationMonitor):
    """Stop fine-tuning when memorisation of the training data rises ("n-gram early stopping").

    The n-gram memorisation score rises before verbatim memorisation, often before validation loss stops improving
    (Slack & Al Moubayed 2025), so stopping on it halves memorisation at little cost. Each check (see
    :class:`MemorisationMonitor`) evaluates the enabled rules on the ``monitor`` score ``M``:

    * ``threshold``: ``M >= threshold`` (absolute bound);
    * ``max_rise``: ``M - M_0 >= max_rise`` where ``M_0`` is the step-0 value of the starting model;
    * ``max_slope``: ``M_t - M_{t-1} >= max_slope`` between consecutive checks.

    Training stops when any rule fires on ``patience`` consecutive checks; the decision is reduced over ranks ("any
    rank stops all"). With ``restore_best=True`` the callback also writes the weights of each new "best n-gram" check
    to a weights-only Lightning checkpoint in ``dirpath`` (``best-epoch=E-step=S.ckpt``, replacing the previous one;
    its path is :attr:`best_model_path`) and loads them back, strictly, at the end of fit: the check with the best
    ``val_monitor`` value among those inside the memorisation bound (``threshold``, else ``M_0 + max_rise``); the
    latest such check when ``val_monitor`` is None; the least-memorising check when none is inside the bound. The
    callback's own state holds only the path, step and scores (no weights).

    Args:
        monitor: which score the rules use: ``"ngram"`` (default), ``"exact"`` or ``"token_acc"``.
        threshold: absolute bound (None disables the rule).
        max_rise: bound on the rise over the step-0 baseline (default 0.10; None disables it).
        max_slope: bound on the rise between consecutive checks (None disables it).
        patience: consecutive firing checks before stopping.
        restore_best: save the "best n-gram" weights to a checkpoint file and load them at the end of fit.
        val_monitor: validation metric for "best n-gram" selection (e.g. ``"val_loss"``), None to ignore it.
        val_mode: ``"min"`` or ``"max"`` for ``val_monitor``.
        verbose: print the reason when stopping.
        **kwargs: :class:`MemorisationMonitor` arguments (``probe_size``, ``prefix_len``, ``suffix_len``, ...).
        dirpath: directory of the best n-gram checkpoint (``restore_best=True``); default
            ``<trainer.log_dir or default_root_dir>/memorisation_best``.

    Attributes:
        best: the best n-gram check (``step``, ``epoch``, ``mem``, ``val``, ``inside_bound``), or None.
        best_model_path: its checkpoint file (``restore_best=True``; ``""`` before the first candidate). The file
            loads with ``YourModule.load_from_checkpoint(path)``.

    Example::

        stopper = MemorisationEarlyStopping(max_rise=0.05, restore_best=True, val_monitor="val_loss")
        Trainer(callbacks=[stopper]).fit(model, datamodule)
        print(stopper.stopping_reason, stopper.best, stopper.best_model_path)

    Defaults are placeholders: the paper's thresholds are not published; calibrate them per data set.
    """

    def __init__(
        self,
        monitor: Literal["ngram", "exact", "token_acc"] = "ngram",
        threshold: float | None = None,
        max_rise: float | None = 0.10,
        max_slope: float | None = None,
        patience: int = 1,
        restore_best: bool = False,
        val_monitor: str | None = None,
        val_mode: Literal["min", "max"] = "min",
        verbose: bool = True,
        probe_size: int = 512,
        prefix_len: int | None = 32,
        suffix_len: int = 32,
        ngram_sizes: list[int] | tuple[int, ...] = (4, 5, 6),
        match: Match = "bag",
        split: Split = "prefix",
        check_every_n_epochs: int | None = 1,
        check_every_n_steps: int | None = None,
        check_at_start: bool = True,
        batch_size: int = 64,
        seed: int = 0,
        model_attr: str | None = None,
        input_key: str = "input_ids",
        labels_key: str = "labels",
        ignore_index: int = -100,
        short_samples: Literal["error", "skip"] = "error",
        log_examples: int = 8,
        progress_bar: bool | None = None,
        tf_every_n_steps: int | None = None,
        dirpath: str | None = None,
    ) -> None:
        super().__init__(
            probe_size=probe_size,
            prefix_len=prefix_len,
            suffix_len=suffix_len,
            ngram_sizes=ngram_sizes,
            match=match,
            split=split,
            check_every_n_epochs=check_every_n_epochs,
            check_every_n_steps=check_every_n_steps,
            check_at_start=check_at_start,
            batch_size=batch_size,
            seed=seed,
            model_attr=model_attr,
            input_key=input_key,
            labels_key=labels_key,
            ignore_index=ignore_index,
            short_samples=short_samples,
            log_examples=log_examples,
            progress_bar=progress_bar,
            tf_every_n_steps=tf_every_n_steps,
        )
        if monitor not in _KEYS:
            raise ValueError(f"`monitor` must be one of {_KEYS}, got {monitor!r}.")
        for name, value in (("threshold", threshold), ("max_rise", max_rise), ("max_slope", max_slope)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"`{name}` must be a number or None, got {value!r}.")
        for name, value in (("max_rise", max_rise), ("max_slope", max_slope)):
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be > 0 (a rise of the score) or None, got {value}.")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1] (scores are fractions), got {threshold}.")
        if threshold is None and max_rise is None and max_slope is None:
            raise ValueError("no stopping rule is enabled: set `threshold`, `max_rise` or `max_slope`.")
        if max_rise is not None and not check_at_start:
            raise ValueError("`max_rise` compares with the step-0 baseline: keep check_at_start=True or unset it.")
        check_int("patience", patience)
        if val_mode not in ("min", "max"):
            raise ValueError(f'`val_mode` must be "min" or "max", got {val_mode!r}.')
        if dirpath is not None and (not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath)):
            raise ValueError(f"`dirpath` must be a directory path or None (the default directory), got {dirpath!r}.")
        self.monitor = monitor
        self.threshold = threshold
        self.max_rise = max_rise
        self.max_slope = max_slope
        self.patience = patience
        self.restore_best = restore_best
        self.val_monitor = val_monitor
        self.val_mode = val_mode
        self.verbose = verbose
        self.dirpath = None if dirpath is None else os.path.expanduser(os.fspath(dirpath))
        self._dirpath: str | None = None  # resolved in setup

    @override
    def _reset(self) -> None:
        super()._reset()
        self.wait_count = 0
        self.stopped_step: int | None = None
        self.stopping_reason: str | None = None
        self.best: dict[str, Any] | None = None
        self.best_model_path = ""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.restore_best:
            # on every rank: trainer.log_dir and the broadcast are collectives
            root = self.dirpath
            if root is None:
                root = os.path.join(trainer.log_dir or trainer.default_root_dir, "memorisation_best")
            # the directory exactly as os.path.dirname gives it back for our files (no trailing separator)
            self._dirpath = os.path.dirname(os.path.join(trainer.strategy.broadcast(root), "_"))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best and self.best_model_path:
            # rank 0 decides (ranks need not share a disk), every rank acts the same
            path = self.best_model_path
            exists = trainer.strategy.broadcast(bool(get_filesystem(path).exists(path)), src=0)
            if not exists:
                # a checkpoint written before a later best of the same run: that run replaced the file
                rank_zero_warn(
                    f"MemorisationEarlyStopping(restore_best=True): the checkpoint's best n-gram weights {path!r} are"
                    " gone (a later best of the run this checkpoint came from replaced them). The best is tracked"
                    " afresh from this resume: the weights restored at the end of fit are the best of the checks"
                    " from here on."
                )
                self.best, self.best_model_path = None, ""
        super().on_train_start(trainer, pl_module)

    @override
    def _baseline_missing(self, trainer: pl.Trainer) -> None:
        if self.max_rise is not None:
            raise ValueError(
                f"MemorisationEarlyStopping(max_rise={self.max_rise}): resuming at step {trainer.global_step} from a"
                " checkpoint whose state has no step-0 baseline (written without this callback, with"
                " check_at_start=False, or by an older version), and measuring it now would use fine-tuned weights."
                " Use `threshold` or `max_slope` with max_rise=None for this run, or restart the fit."
            )
        super()._baseline_missing(trainer)

    def bound(self) -> float | None:
        """The memorisation bound used for "best n-gram" selection (None before the baseline is known)."""
        if self.threshold is not None:
            return self.threshold
        if self.max_rise is not None and self.baseline is not None:
            return self.baseline[self.monitor] + self.max_rise
        return None

    def rules_fired(self, current: float, previous: float | None) -> list[str]:
        """The rules that fire for the score ``current`` after ``previous`` (pure; used by the callback)."""
        fired = []
        if self.threshold is not None and current >= self.threshold:
            fired.append(f"mem/{self.monitor} = {current:.4f} >= threshold {self.threshold}")
        if self.max_rise is not None and self.baseline is not None:
            rise = current - self.baseline[self.monitor]
            if rise >= self.max_rise:
                fired.append(f"mem/{self.monitor} rose {rise:.4f} >= max_rise {self.max_rise} over step 0")
        if self.max_slope is not None and previous is not None and current - previous >= self.max_slope:
            fired.append(f"mem/{self.monitor} rose {current - previous:.4f} >= max_slope {self.max_slope} in 1 check")
        return fired

    @override
    def _after_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        current = values[self.monitor]
        previous = self.history[-2][self.monitor] if len(self.history) >= 2 else None
        if self.restore_best:
            self._update_best(trainer, pl_module, values)
        fired = self.rules_fired(current, previous)
        self.wait_count = self.wait_count + 1 if fired else 0
        should_stop = trainer.strategy.reduce_boolean_decision(self.wait_count >= self.patience, all=False)
        if should_stop and not trainer.should_stop:
            self.stopped_step = trainer.global_step
            self.stopping_reason = "; ".join(fired) or "another rank's memorisation rule fired"
            if self.verbose:
                rank_zero_info(
                    f"MemorisationEarlyStopping: stopping at epoch {trainer.current_epoch}, step"
                    f" {trainer.global_step}: {self.stopping_reason}."
                )
        trainer.should_stop = trainer.should_stop or should_stop

    def _update_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        bound = self.bound()
        current = values[self.monitor]
        metric = trainer.callback_metrics.get(self.val_monitor) if self.val_monitor is not None else None
        candidate = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        candidate.update({"inside_bound": bound is None or current <= bound, "mem": current})
        candidate["val"] = None if metric is None else float(metric)
        # rank 0 decides (a val_monitor logged without sync_dist may differ across ranks): every rank keeps the same
        candidate = trainer.strategy.broadcast(candidate, src=0)
        if self.val_monitor is not None and candidate["val"] is None:
            rank_zero_warn(
                f"MemorisationEarlyStopping(val_monitor={self.val_monitor!r}): the metric is not logged yet"
                f" (available: {sorted(trainer.callback_metrics)}); this check is not a best-n-gram candidate.",
            )
            return
        if self._is_better(candidate, self.best):
            self.best = candidate
            self._save_best(trainer)

    def _save_best(self, trainer: pl.Trainer) -> None:
        """Write the weights of the new best check to a weights-only Lightning checkpoint (a collective: every rank
        calls it, rank 0 writes) and remove the previous best file of this directory."""
        assert self._dirpath is not None and self.best is not None
        path = os.path.join(self._dirpath, f"best-epoch={self.best['epoch']}-step={self.best['step']}.ckpt")
        trainer.save_checkpoint(path, weights_only=True)
        previous = self.best_model_path
        # like ModelCheckpoint: only files of the current directory (a resume into another directory keeps the old)
        if previous and previous != path and os.path.dirname(previous) == self._dirpath:
            trainer.strategy.remove_checkpoint(previous)
        self.best_model_path = path

    def _is_better(self, new: dict[str, Any], old: dict[str, Any] | None) -> bool:
        if old is None:
            return True
        if new["inside_bound"] != old["inside_bound"]:
            return bool(new["inside_bound"])
        if not new["inside_bound"]:
            return new["mem"] < old["mem"]
        if new["val"] is None or old["val"] is None:
            return True  # no validation metric: the latest check inside the bound
        if math.isnan(new["val"]):
            return math.isnan(old["val"])  # NaN is worse than any number (a NaN best is replaced by the latest)
        if math.isnan(old["val"]):
            return True
        return new["val"] < old["val"] if self.val_mode == "min" else new["val"] > old["val"]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best and self.best_model_path:
            with get_filesystem(self.best_model_path).open(self.best_model_path, "rb") as f:
                # our own file (weights_only=False: the module's hyper-parameters may hold arbitrary objects)
                checkpoint = torch.load(f, map_location=pl_module.device, weights_only=False)
            pl_module.load_state_dict(checkpoint["state_dict"], strict=True)
            if self.verbose:
                rank_zero_info(f"MemorisationEarlyStopping: restored the best n-gram weights {self.best}.")

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            wait_count=self.wait_count,
            stopped_step=self.stopped_step,
            stopping_reason=self.stopping_reason,
            best=copy.deepcopy(self.best),
            best_model_path=self.best_model_path,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.wait_count = state_dict.get("wait_count", 0)
        self.stopped_step = state_dict.get("stopped_step")
        self.stopping_reason = state_dict.get("stopping_reason")
        self.best = state_dict.get("best")
        self.best_model_path = state_dict.get("best_model_path", "")
        if self.best is not None and not self.best_model_path:
            # an older checkpoint kept the weights in the callback state; they are not used any more
            if self.restore_best:
                rank_zero_warn(
                    "MemorisationEarlyStopping: the checkpoint's best n-gram check has no weights file (an older"
                    " checkpoint format); it is forgotten, and the next check becomes the best candidate."
                )
            self.best = None
