"""``lightning-ft demo backdoor``: the fast variant runs end to end and prints one row per defense."""

from __future__ import annotations

import json

import pytest

from lightning_ft.demos import DEMOS, load_demo
from lightning_ft.demos.backdoor import KINDS, BackdoorDemoConfig, main


def test_backdoor_demo_is_registered():
    assert "backdoor" in DEMOS and load_demo("backdoor") is main


def test_fast_demo_prints_every_defense(tmp_path, capsys):
    path = tmp_path / "out.json"
    rows = main(fast=True, json_path=str(path))
    out = capsys.readouterr().out
    assert [r["kind"] for r in rows] == list(KINDS)
    for kind in KINDS:
        assert f"| {kind} |" in out
    saved = json.loads(path.read_text())
    assert [r["kind"] for r in saved["runs"]] == list(KINDS)
    for row in rows:
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["asr"] <= 1.0 and 0.0 <= row["der"] <= 1.0


@pytest.mark.parametrize(("kwargs", "match"), [({"attack": "wanet"}, "attack"), ({"kinds": ("nope",)}, "kinds")])
def test_config_rejects_unknown_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackdoorDemoConfig(**kwargs)
