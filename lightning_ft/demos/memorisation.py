"""End-to-end memorisation demo: plain fine-tuning vs n-gram early stopping vs the n-gram regulariser.

A tiny GPT-2 is "pre-trained" on one half of CPython's pydoc topics (cached on disk after the first run), then
fine-tuned for many epochs on a small set of chunks from the other half, the regime where small models memorise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_ft.demos._common import cpu_trainer as _trainer
from lightning_ft.demos._common import prepare_demo_process
from lightning_ft.demos.models import CausalLMModule, GoldfishCausalLMModule, RegularizedCausalLMModule
from lightning_ft.demos.text import PydocTextDataModule
from lightning_ft.memorisation.callbacks import MemorisationEarlyStopping, MemorisationMonitor

__all__ = ["KINDS", "MemorisationDemoConfig", "finetune", "main", "pretrained_base"]

KINDS = ("plain", "early_stopping", "best_ngram", "regularizer", "goldfish")


@dataclass
class MemorisationDemoConfig:
    """Every knob of the demo; the defaults are what the method card reports."""

    vocab_size: int = 1024
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 64
    pretrain_epochs: int = 2
    pretrain_lr: float = 2e-3
    n_train: int = 32
    n_val: int = 128
    batch_size: int = 8
    epochs: int = 30
    lr: float = 3e-3
    prefix_len: int = 32
    suffix_len: int = 32
    max_rise: float = 0.10
    reg_weight: float = 3.0
    reg_gamma: float = 0.5
    reg_ngram_sizes: tuple[int, ...] = field(default_factory=lambda: (4,))
    goldfish_k: int = 4
    goldfish_h: int = 13
    seed: int = 0

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "n_positions": max(128, self.seq_len),
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "seed": self.seed,
        }


def cache_dir() -> Path:
    """Where the pre-trained base is cached: ``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``."""
    return Path(os.environ.get("LIGHTNING_FT_CACHE", Path.home() / ".cache" / "lightning_ft"))


def pretrained_base(config: MemorisationDemoConfig, verbose: bool = True) -> dict[str, torch.Tensor]:
    """State dict of the tiny GPT-2 pre-trained on the "pretrain" topics; trained once, then loaded from the cache."""
    keys = ("vocab_size", "n_embd", "n_layer", "n_head", "seq_len", "pretrain_epochs", "pretrain_lr", "seed")
    tag = json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True)
    path = cache_dir() / f"pydoc-base-{hashlib.sha1(tag.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    if verbose:
        print(f"pre-training the tiny base model once (cached at {path}) ...", flush=True)
    pl.seed_everything(config.seed, verbose=False)
    module = CausalLMModule(lr=config.pretrain_lr, **config.model_kwargs())
    data = PydocTextDataModule(
        config.seq_len, "pretrain", None, 64, batch_size=32, vocab_size=config.vocab_size, seed=config.seed
    )
    _trainer(config.pretrain_epochs, limit_val_batches=0).fit(module, data)
    state = module.model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return state


class ValLossHistory(pl.Callback):
    """Records ``val_loss`` after every validation epoch (for plots of memorisation vs validation loss)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and "val_loss" in trainer.callback_metrics:
            value = float(trainer.callback_metrics["val_loss"])
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "val_loss": value})


@dataclass
class FinetuneResult:
    """One fine-tuning run: what the demo table prints (+ the per-epoch history of the probe)."""

    name: str
    epochs_trained: int
    val_ppl: float
    ngram: float
    exact: float
    token_acc: float
    seconds: float
    history: list[dict[str, float]]
    val_history: list[dict[str, float]]


def finetune(
    kind: str,
    config: MemorisationDemoConfig,
    base_state: dict[str, torch.Tensor] | None = None,
    extra_callbacks: list[pl.Callback] | None = None,
    **trainer_kwargs: Any,
) -> FinetuneResult:
    """Fine-tune the base on the small pydoc set with one of :data:`KINDS`.

    ``"early_stopping"`` stops with :class:`MemorisationEarlyStopping` (``max_rise``) and keeps the weights it stopped
    with; ``"best_ngram"`` also restores the best-``val_loss`` weights inside the bound. Every run carries a
    :class:`MemorisationMonitor` (the early-stopping callback is one) over the whole training set, checked each
    epoch; the final scores are measured on the weights the run ends with.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    pl.seed_everything(config.seed, verbose=False)
    if kind == "regularizer":
        module: CausalLMModule = RegularizedCausalLMModule(
            reg_weight=config.reg_weight,
            reg_gamma=config.reg_gamma,
            reg_ngram_sizes=config.reg_ngram_sizes,
            lr=config.lr,
            **config.model_kwargs(),
        )
    elif kind == "goldfish":
        module = GoldfishCausalLMModule(
            goldfish_k=config.goldfish_k, goldfish_h=config.goldfish_h, lr=config.lr, **config.model_kwargs()
        )
    else:
        module = CausalLMModule(lr=config.lr, **config.model_kwargs())
    if base_state is not None:
        module.model.load_state_dict(base_state)
        if isinstance(module, RegularizedCausalLMModule):
            module.reset_reference()
    data = PydocTextDataModule(
        config.seq_len, "finetune", config.n_train, config.n_val, config.batch_size, config.vocab_size, config.seed
    )
    probe_args = {"probe_size": config.n_train, "prefix_len": config.prefix_len, "suffix_len": config.suffix_len}
    monitor: MemorisationMonitor
    best_dir = tempfile.TemporaryDirectory()  # restore_best's checkpoint lives only as long as the fit
    if kind in ("early_stopping", "best_ngram"):
        best = (
            {"restore_best": True, "val_monitor": "val_loss", "dirpath": best_dir.name} if kind == "best_ngram" else {}
        )
        monitor = MemorisationEarlyStopping(max_rise=config.max_rise, verbose=False, **best, **probe_args)
    else:
        monitor = MemorisationMonitor(**probe_args)
    val_history = ValLossHistory()
    trainer = _trainer(config.epochs, [monitor, val_history, *(extra_callbacks or [])], **trainer_kwargs)
    start = time.perf_counter()
    try:
        trainer.fit(module, data)
    finally:
        best_dir.cleanup()
    seconds = time.perf_counter() - start
    final = monitor.evaluate(trainer, module)[0]  # the weights the run ends with (restored best, if any)
    val_loss = trainer.validate(module, data, verbose=False)[0]["val_loss"]
    return FinetuneResult(
        name=kind,
        epochs_trained=trainer.current_epoch,
        val_ppl=math.exp(val_loss),
        ngram=final["ngram"],
        exact=final["exact"],
        token_acc=final["token_acc"],
        seconds=seconds,
        history=monitor.history,
        val_history=val_history.history,
    )


def format_table(results: list[FinetuneResult]) -> str:
    """Markdown table of the runs."""
    lines = [
        "| run | epochs trained | val ppl | mem/ngram | mem/exact | mem/token_acc | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.epochs_trained} | {r.val_ppl:.2f} | {r.ngram:.3f} | {r.exact:.3f} | {r.token_acc:.3f}"
            f" | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(fast: bool = False, json_path: str | None = None) -> list[FinetuneResult]:
    """Run the fine-tunings of :data:`KINDS` and print the table (``fast``: fewer epochs, for smoke tests)."""
    prepare_demo_process()
    config = MemorisationDemoConfig()
    if fast:
        config.epochs, config.pretrain_epochs = 4, 1
    base = pretrained_base(config)
    results = []
    for kind in KINDS:
        print(f"fine-tuning: {kind} ...", flush=True)
        results.append(finetune(kind, config, base))
    print()
    print(format_table(results))
    if json_path:
        Path(json_path).write_text(json.dumps({"config": asdict(config), "runs": [asdict(r) for r in results]}))
    return results
