"""Generic tests over every registered callback: fit, resume, DDP parity, YAML snippet, composition."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

import lightning_ft.callbacks as ft_callbacks
from tests.helpers.ddp import run_ddp_script
from tests.helpers.registry import REGISTRY
from tests.helpers.resume import fit_and_resume, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(REGISTRY)


def test_every_public_callback_is_registered():
    public = {
        name
        for name in ft_callbacks.__all__
        if inspect.isclass(getattr(ft_callbacks, name)) and issubclass(getattr(ft_callbacks, name), Callback)
    }
    assert public == set(REGISTRY), "add the missing callbacks to tests/helpers/registry.py"


@pytest.mark.parametrize("name", NAMES)
def test_yaml_snippet_exists(name):
    entry = REGISTRY[name]
    path = ROOT / "callbacks" / entry.yaml
    assert entry.yaml and path.exists(), f"{name} needs a LightningCLI snippet in callbacks/"
    assert f"lightning_ft.callbacks.{name}" in path.read_text()


@pytest.mark.parametrize("name", NAMES)
def test_fit_runs_and_state_is_serialisable(name, tmp_path):
    entry = REGISTRY[name]
    callback = entry.make()
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path, **entry.trainer_kwargs)
    trainer.fit(entry.make_module(), entry.make_data())
    state = callback.state_dict()
    torch.save(state, tmp_path / "state.pt")  # picklable: goes into checkpoints
    fresh = entry.make()
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert json.dumps(fresh.state_dict(), default=repr, sort_keys=True) == json.dumps(
        state, default=repr, sort_keys=True
    )


def _params(module: pl.LightningModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("name", NAMES)
def test_stop_and_resume_equals_uninterrupted(name, tmp_path):
    entry = REGISTRY[name]
    (full_module, full_cbs), (resumed_module, resumed_cbs) = fit_and_resume(
        entry.make_module, entry.make_data, lambda: [entry.make()], max_epochs=3, stop_epoch=1, tmp_path=tmp_path
    )
    assert torch.equal(_params(full_module), _params(resumed_module))
    full_state = json.dumps(full_cbs[0].state_dict(), default=repr, sort_keys=True)
    resumed_state = json.dumps(resumed_cbs[0].state_dict(), default=repr, sort_keys=True)
    assert full_state == resumed_state


@pytest.mark.ddp
@pytest.mark.parametrize("name", NAMES)
def test_ddp_ranks_agree(name, tmp_path):
    r0, r1 = run_ddp_script("ddp_registry.py", tmp_path, name)
    assert r0["world_size"] == 2
    assert r0["param_max_diff"] == 0.0 and r1["param_max_diff"] == 0.0
    assert r0["state"] == r1["state"]
    assert r0["global_step"] == r1["global_step"]


# callbacks that share a model family (a causal LM, an image classifier) compose in one Trainer
GROUPS: dict[str, list[str]] = {}
for _name in NAMES:
    GROUPS.setdefault(REGISTRY[_name].make_module.__name__, []).append(_name)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_all_callbacks_compose_with_lightning_callbacks(group, tmp_path):
    """Every registered callback of one model family in one Trainer with EarlyStopping and ModelCheckpoint: each
    still does its job."""
    names = GROUPS[group]
    callbacks = [REGISTRY[name].make() for name in names]
    entry = max((REGISTRY[name] for name in names), key=lambda e: e.group_data_priority)
    monitor, mode = entry.monitor
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=monitor, mode=mode, save_top_k=1)
    early = EarlyStopping(monitor="val_loss", patience=100)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[*callbacks, checkpoint, early], enable_checkpointing=True, default_root_dir=tmp_path
    )
    trainer.fit(entry.make_module(), entry.make_data())
    for callback in callbacks:
        if hasattr(callback, "history"):
            assert len(callback.history) == 3, f"{type(callback).__name__} missed checks"
        if hasattr(callback, "done"):
            assert callback.done, f"{type(callback).__name__} did not run"
        if hasattr(callback, "steps"):
            assert callback.steps == trainer.global_step, f"{type(callback).__name__} missed steps"
    assert checkpoint.best_model_path, f"ModelCheckpoint could not monitor {monitor}"
    assert early.wait_count == 0 or early.best_score is not None
