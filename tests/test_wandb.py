"""Logging: an offline W&B smoke run of MemorisationMonitor, and ``log_table``/``log_scalars`` on every logger kind."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_ft._internal.logging import is_wandb_logger, log_scalars, log_table
from lightning_ft.callbacks import MemorisationMonitor
from lightning_ft.demos.models import CausalLMModule
from lightning_ft.demos.text import PydocTextDataModule
from tests.helpers.registry import REGISTRY
from tests.helpers.resume import quiet_trainer


def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-ft-tests")
    assert is_wandb_logger(logger)
    monitor = MemorisationMonitor(probe_size=4, prefix_len=16, suffix_len=8, ngram_sizes=(2, 3), log_examples=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[monitor],
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = CausalLMModule(vocab_size=1024, n_embd=32, n_layer=1, n_head=2)
    try:
        trainer.fit(model, PydocTextDataModule(n_train=8, n_val=8, batch_size=4))
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, f"no offline run under {tmp_path / 'wandb'}: {list(tmp_path.rglob('*'))[:20]}"
    assert "mem/ngram" in trainer.callback_metrics
    assert len(monitor.history) == 2  # the step-0 baseline and the end of the epoch


def test_log_scalars_and_table_tensorboard_and_csv(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(logger=[tb, csv_logger], default_root_dir=tmp_path, enable_progress_bar=False)
    log_scalars(trainer, {"mem/ngram": 0.25, "mem/exact": 0.0}, step=3)
    log_scalars(trainer, {"mem/ngram": 0.5})  # default step: the trainer's global step (0)
    log_table(trainer, "mem/examples", ["index", "ngram", "text"], [[0, 0.5, "a | b"], [1, 0.25, "c\nd"]], step=3)
    tb.experiment.flush()
    csv_logger.save()
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_step = {int(r["step"]): r for r in rows}
    assert float(by_step[3]["mem/ngram"]) == pytest.approx(0.25)
    assert float(by_step[3]["mem/exact"]) == 0.0
    assert float(by_step[0]["mem/ngram"]) == pytest.approx(0.5)


class WandbLogger:
    """A W&B-like logger recording calls (``is_wandb_logger`` checks the class name and ``log_table``)."""

    def __init__(self) -> None:
        self.tables: list[dict[str, Any]] = []
        self.metrics: list[tuple[dict[str, float], int | None]] = []

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data, "step": step})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((metrics, step))


def test_log_table_and_scalars_with_a_wandb_like_logger() -> None:
    fake = WandbLogger()
    assert is_wandb_logger(fake)
    trainer = SimpleNamespace(global_step=7, loggers=[fake], callback_metrics={})
    rows = [(0, 0.5, "prompt"), (1, 0.25, "other")]
    log_table(trainer, "mem/examples", ("index", "ngram", "prompt"), rows)  # type: ignore[arg-type]
    log_scalars(trainer, {"mem/ngram": 0.5}, step=9)  # type: ignore[arg-type]
    assert fake.tables == [
        {
            "key": "mem/examples",
            "columns": ["index", "ngram", "prompt"],
            "data": [[0, 0.5, "prompt"], [1, 0.25, "other"]],
            "step": 7,
        }
    ]
    assert fake.metrics == [({"mem/ngram": 0.5}, 9)]


def test_log_bar_chart_wandb_and_tensorboard(tmp_path: Path) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning_ft._internal.logging import log_bar_chart

    class Experiment:
        def __init__(self) -> None:
            self.logged: list[dict[str, Any]] = []

        def log(self, data: dict[str, Any]) -> None:
            self.logged.append(data)

    fake = WandbLogger()
    fake.experiment = Experiment()  # type: ignore[attr-defined]
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = SimpleNamespace(global_step=4, loggers=[fake, tb, CSVLogger(tmp_path, name="csv")], callback_metrics={})
    log_bar_chart(trainer, "rehearsal/alpha_by_bin", ["bin 0", "bin 1"], [0.25, 0.5])  # type: ignore[arg-type]
    (logged,) = fake.experiment.logged  # type: ignore[attr-defined]
    assert logged["trainer/global_step"] == 4
    chart = logged["rehearsal/alpha_by_bin"]
    assert isinstance(chart, wandb.plot.custom_chart.CustomChart)
    assert chart.table.data == [["bin 0", 0.25], ["bin 1", 0.5]]
    with pytest.raises(ValueError):  # labels and values must pair up
        log_bar_chart(trainer, "x", ["a"], [1.0, 2.0])  # type: ignore[arg-type]


_WANDB_TYPES = {"histogram": "histogram", "table": "table-file", "chart": None}


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if REGISTRY[n].wandb_keys))
def test_wandb_receives_what_the_card_promises(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real offline W&B run of each registered callback; what the run holds is read back from its summary."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    entry = REGISTRY[name]
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-ft-tests")
    callback = entry.cls(**{**entry.kwargs, **entry.wandb_kwargs})
    trainer = quiet_trainer(
        max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[callback], **entry.trainer_kwargs
    )
    try:
        pl.seed_everything(0, verbose=False)
        trainer.fit(entry.make_module(), entry.make_data())
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()
    for key, kind in entry.wandb_keys.items():
        if kind == "chart":  # wandb.plot custom charts are stored as their table
            assert any(k.startswith(key) for k in summary), f"{name}: no {key} chart in {sorted(summary)}"
            continue
        assert key in summary, f"{name}: W&B got no {key!r}; it got {sorted(summary)}"
        if kind == "scalar":
            assert isinstance(summary[key], (int, float)), (key, summary[key])
        else:
            assert summary[key]["_type"] == _WANDB_TYPES[kind], (key, dict(summary[key]))
