"""``lightning_ft._internal.resume``: the essential-argument check on resume and states under old argument keys."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft._internal.resume import check_resumed_arguments, legacy_key_arguments
from tests.helpers.registry import REGISTRY
from tests.helpers.resume import quiet_trainer


def test_check_resumed_arguments_names_what_changed_and_accepts_older_states():
    check_resumed_arguments("C", None, {"a": 1}, "x")  # an older checkpoint without stored arguments
    check_resumed_arguments("C", {}, {"a": 1}, "x")
    check_resumed_arguments("C", {"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2), "new": 3}, "x")  # tuple == list
    with pytest.raises(ValueError, match=r"C: .*\(a=1 -> 2\), so its state is stale\. Resume with .* `ckpt_path`"):
        check_resumed_arguments("C", {"a": 1, "b": 2}, {"a": 2, "b": 2}, "its state is stale")


def test_legacy_key_arguments_reads_lightnings_generated_key():
    key = "LearnedMaskPruning{'sparsity': 0.5, 'gate_type': 'sigmoid'}"
    assert legacy_key_arguments(key, "LearnedMaskPruning") == {"sparsity": 0.5, "gate_type": "sigmoid"}
    assert legacy_key_arguments("LearnedMaskPruning{<object at 0x1>}", "LearnedMaskPruning") == {}


# the arguments the state key of each callback held before it became the class name
OLD_KEY_ARGUMENTS = {
    "NeuronWeightChangeReinit": ("neuron_ratio", "subweight_ratio"),
    "ReconstructiveNeuronPruning": ("threshold",),
    "LearnedMaskPruning": ("sparsity", "gate_type"),
}


def _old_checkpoint(name, tmp_path, **key_changes):
    """A checkpoint of a 1-epoch fit with the callback's state moved to its old key (and without "arguments")."""
    entry = REGISTRY[name]
    callback = entry.make()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = quiet_trainer(callbacks=[callback, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(entry.make_module(), entry.make_data())
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["callbacks"].pop(name)
    state.pop("arguments")
    old = {k: getattr(callback, k) for k in OLD_KEY_ARGUMENTS[name]} | key_changes
    ckpt["callbacks"][callback._generate_state_key(**old)] = state
    torch.save(ckpt, tmp_path / "old.ckpt")
    return entry, state


@pytest.mark.parametrize("name", sorted(OLD_KEY_ARGUMENTS))
def test_state_under_the_old_argument_key_is_still_found(name, tmp_path, monkeypatch):
    entry, state = _old_checkpoint(name, tmp_path)
    loaded = []
    original = entry.cls.load_state_dict
    monkeypatch.setattr(entry.cls, "load_state_dict", lambda self, s: (loaded.append(s), original(self, s))[1])
    trainer = quiet_trainer(callbacks=[entry.make()], max_epochs=2)
    trainer.fit(entry.make_module(), entry.make_data(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert len(loaded) == 1 and loaded[0].keys() == state.keys()
    assert trainer.global_step > 0


@pytest.mark.parametrize("name", sorted(OLD_KEY_ARGUMENTS))
def test_old_argument_key_with_other_essential_values_raises(name, tmp_path):
    argument = OLD_KEY_ARGUMENTS[name][0]
    entry, _ = _old_checkpoint(name, tmp_path, **{argument: 0.25})
    trainer = quiet_trainer(callbacks=[entry.make()], max_epochs=2)
    with pytest.raises(ValueError, match=f"{argument}=0.25 -> "):
        trainer.fit(entry.make_module(), entry.make_data(), ckpt_path=str(tmp_path / "old.ckpt"))
