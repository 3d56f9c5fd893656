"""MemorisationMonitor / MemorisationEarlyStopping: rules, validation, DDP agreement and resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lightning_ft.memorisation import MemorisationEarlyStopping, MemorisationMonitor
from tests.helpers.data import pydoc_datamodule
from tests.helpers.ddp import run_ddp_script
from tests.helpers.models import tiny_lm_module
from tests.helpers.resume import fit_and_resume, quiet_trainer

PROBE = {"probe_size": 8, "prefix_len": 16, "suffix_len": 16, "ngram_sizes": (2, 3), "batch_size": 4}


class FakeStrategy:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def fake_trainer(step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(strategy=FakeStrategy(), should_stop=False, global_step=step, current_epoch=step)


def scripted(stopper: MemorisationEarlyStopping, scores: list[float], baseline: float = 0.1) -> int | None:
    """Feed a scripted sequence of n-gram scores; return the index of the check that stopped (or None)."""
    stopper.baseline = {"ngram": baseline, "exact": 0.0, "token_acc": 0.0}
    stopper.history = [{"step": 0, "ngram": baseline, "exact": 0.0, "token_acc": 0.0}]
    trainer = fake_trainer()
    for i, score in enumerate(scores):
        trainer.global_step = i + 1
        values = {"step": i + 1, "epoch": i, "ngram": score, "exact": 0.0, "token_acc": 0.0}
        stopper.history.append(values)
        stopper._after_check(trainer, None, values)  # type: ignore[arg-type]
        if trainer.should_stop:
            return i
    return None


@pytest.mark.parametrize(
    ("kwargs", "scores", "expected"),
    [
        ({"threshold": 0.5, "max_rise": None}, [0.2, 0.4, 0.5, 0.6], 2),
        ({"threshold": 0.5, "max_rise": None, "patience": 2}, [0.2, 0.6, 0.4, 0.6, 0.7], 4),
        ({"max_rise": 0.1}, [0.15, 0.19, 0.2, 0.3], 2),
        ({"max_rise": None, "max_slope": 0.1}, [0.12, 0.15, 0.3, 0.31], 2),
        ({"max_rise": 0.5}, [0.2, 0.3, 0.4], None),
    ],
)
def test_stopping_rules_on_scripted_scores(kwargs, scores, expected):
    stopper = MemorisationEarlyStopping(**kwargs, verbose=False)
    assert scripted(stopper, scores) == expected
    if expected is not None:
        assert stopper.stopping_reason and "mem/ngram" in stopper.stopping_reason
        assert stopper.stopped_step == expected + 1


def test_patience_counts_consecutive_checks_only():
    stopper = MemorisationEarlyStopping(threshold=0.5, max_rise=None, patience=3, verbose=False)
    assert scripted(stopper, [0.6, 0.6, 0.4, 0.6, 0.6, 0.4]) is None
    assert stopper.wait_count == 0


def test_early_stopping_state_round_trip():
    stopper = MemorisationEarlyStopping(threshold=0.5, max_rise=None, patience=3, verbose=False)
    scripted(stopper, [0.6, 0.7])
    restored = MemorisationEarlyStopping(threshold=0.5, max_rise=None, patience=3, verbose=False)
    restored.load_state_dict(stopper.state_dict())
    assert restored.wait_count == 2 and restored.baseline == stopper.baseline and restored.history == stopper.history
    trainer = fake_trainer(3)
    values = {"step": 3, "epoch": 2, "ngram": 0.8, "exact": 0.0, "token_acc": 0.0}
    restored.history.append(values)
    restored._after_check(trainer, None, values)  # type: ignore[arg-type]
    assert trainer.should_stop  # the third consecutive firing check after the resume


def test_old_checkpoint_state_loads_with_defaults():
    stopper = MemorisationEarlyStopping(verbose=False)
    stopper.load_state_dict({})
    assert stopper.wait_count == 0 and stopper.history == [] and stopper.baseline is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"suffix_len": 3, "ngram_sizes": (4,)}, "suffix_len"),
        ({"ngram_sizes": ()}, "ngram_sizes"),
        ({"ngram_sizes": (0, 2)}, "ngram_sizes"),
        ({"probe_size": 0}, "probe_size"),
        ({"prefix_len": None}, "prefix_len"),
        ({"split": "middle"}, "split"),
        ({"match": "fuzzy"}, "match"),
        ({"check_every_n_epochs": 0}, "check_every_n_epochs"),
        ({"check_every_n_epochs": None, "check_at_start": False}, "never run"),
        ({"short_samples": "pad"}, "short_samples"),
        ({"log_examples": -1}, "log_examples"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorisationMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor": "bleu"}, "monitor"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": None, "max_rise": None, "max_slope": None}, "no stopping rule"),
        ({"max_rise": 0.1, "check_at_start": False}, "check_at_start"),
        ({"patience": 0}, "patience"),
        ({"val_mode": "up"}, "val_mode"),
    ],
)
def test_early_stopping_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorisationEarlyStopping(**kwargs)


class BackboneOnly(pl.LightningModule):
    """A LightningModule whose transformer has no LM head: the monitor must refuse it at setup."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.model = GPT2Model(GPT2Config(vocab_size=1024, n_positions=64, n_embd=32, n_layer=1, n_head=2))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"]).last_hidden_state.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_rejects_model_without_lm_head():
    trainer = quiet_trainer(max_epochs=1, callbacks=[MemorisationMonitor(**PROBE)], limit_val_batches=0)
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        trainer.fit(BackboneOnly(), pydoc_datamodule())


def test_monitor_rejects_samples_shorter_than_prefix_plus_suffix():
    trainer = quiet_trainer(max_epochs=1, callbacks=[MemorisationMonitor(probe_size=4, prefix_len=32, suffix_len=32)])
    with pytest.raises(ValueError, match="prefix_len"):
        trainer.fit(tiny_lm_module(), pydoc_datamodule(seq_len=48))


def test_monitor_logs_step_zero_and_every_epoch(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    monitor = MemorisationMonitor(**PROBE)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], logger=CSVLogger(tmp_path), limit_val_batches=0)
    trainer.fit(tiny_lm_module(), pydoc_datamodule())
    assert [h["step"] for h in monitor.history] == [0, 4, 8]
    assert monitor.baseline == {k: monitor.history[0][k] for k in ("ngram", "exact", "token_acc")}
    assert {"mem/ngram", "mem/exact", "mem/token_acc"} <= set(trainer.callback_metrics)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "mem/ngram" in metrics and "mem/ngram_baseline" in metrics
    assert trainer.lightning_module.model.training  # train mode restored after generation


def test_monitor_checks_every_n_steps():
    monitor = MemorisationMonitor(**PROBE, check_every_n_epochs=None, check_every_n_steps=3)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(tiny_lm_module(), pydoc_datamodule())
    assert [h["step"] for h in monitor.history] == [0, 3, 6]


def test_resume_reproduces_the_monitor_history(tmp_path):
    def callbacks():
        best_dir = str(tmp_path / "best")  # the uninterrupted and the resumed run share it, as their state compares
        return [MemorisationEarlyStopping(**PROBE, max_rise=0.9, restore_best=True, verbose=False, dirpath=best_dir)]

    (_, full), (_, resumed) = fit_and_resume(
        tiny_lm_module, pydoc_datamodule, callbacks, max_epochs=3, stop_epoch=1, tmp_path=tmp_path
    )
    assert resumed[0].state_dict()["probe_indices"] == full[0].state_dict()["probe_indices"]
    assert resumed[0].history == full[0].history  # step 0 is not re-measured: it comes from the checkpoint
    assert [h["step"] for h in full[0].history] == [0, 4, 8, 12]
    assert resumed[0].best == full[0].best
    assert resumed[0].best_model_path == full[0].best_model_path and Path(full[0].best_model_path).exists()


@pytest.mark.ddp
def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    ranks = run_ddp_script("ddp_memorisation.py", tmp_path / "ddp")
    single = run_ddp_script("ddp_memorisation.py", tmp_path / "single", devices=1)[0]
    r0, r1 = ranks
    assert r0["world_size"] == 2
    assert r0["history"] == r1["history"], "ranks logged different mem/* values"
    assert r0["stopped_step"] is not None and r0["stopped_step"] == r1["stopped_step"] == r0["global_step"]
    assert r0["stopped_step"] < 8 * 3, "the early stop should fire before the last epoch"
    assert r0["param_max_diff"] == 0.0 and r1["param_max_diff"] == 0.0
    # restore_best: one file, written by rank 0 at the best check, loaded on both ranks at the end of fit
    assert r0["best"] == r1["best"] and r0["best"] is not None and r0["best"]["step"] < r0["stopped_step"]
    assert r0["best_model_path"] == r1["best_model_path"]
    assert [p.name for p in (tmp_path / "ddp" / "best").iterdir()] == [Path(r0["best_model_path"]).name]
    # the sharded, reduced scores of the best check equal an unsharded single-rank scoring of the whole probe with
    # the restored weights
    best = next(h for h in r0["history"] if h["step"] == r0["best"]["step"])
    for key in ("ngram", "exact", "token_acc"):
        assert r0["full_probe_scores"][key] == pytest.approx(best[key], abs=1e-6)
    # same probe and same starting weights: the step-0 values of the 2-process run equal the 1-process run's
    assert single["probe_indices"] == r0["probe_indices"]
    for key in ("ngram", "exact", "token_acc"):
        assert single["history"][0][key] == pytest.approx(r0["history"][0][key], abs=1e-6)


def test_teacher_forced_proxy_is_logged_and_matches_a_direct_computation():
    monitor = MemorisationMonitor(**PROBE, tf_every_n_steps=2)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], limit_val_batches=0)
    module = tiny_lm_module()
    trainer.fit(module, pydoc_datamodule())
    assert [h["step"] for h in monitor.tf_history] == [2, 4, 6, 8]
    assert "mem/tf_acc" in trainer.callback_metrics
    probe = monitor.probe
    ids = torch.cat([torch.stack(probe.prefixes), probe.suffixes], 1)
    module.model.eval()
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits[:, PROBE["prefix_len"] - 1 : -1]
    direct = (logits.argmax(-1) == probe.suffixes).float().mean().item()
    assert monitor.tf_history[-1]["tf_acc"] == pytest.approx(direct, abs=1e-6)
    # the proxy upper-bounds exact extraction: every extracted suffix is fully right under teacher forcing
    assert monitor.tf_history[-1]["tf_acc"] >= monitor.history[-1]["exact"]
