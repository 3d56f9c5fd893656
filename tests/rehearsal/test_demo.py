"""``lightning-ft demo rehearsal``: the fast variant runs end to end and prints one row per run."""

from __future__ import annotations

import json

import pytest

from lightning_ft.demos import DEMOS, load_demo
from lightning_ft.demos.rehearsal import KINDS, RehearsalDemoConfig, main


def test_rehearsal_demo_is_registered():
    assert "rehearsal" in DEMOS and load_demo("rehearsal") is main


def test_fast_demo_prints_every_run(tmp_path, capsys):
    path = tmp_path / "out.json"
    rows = main(fast=True, json_path=str(path))
    out = capsys.readouterr().out
    assert [r["kind"] for r in rows] == list(KINDS)
    for kind in KINDS:
        assert f"| {kind} |" in out
    saved = json.loads(path.read_text())
    assert [r["kind"] for r in saved["runs"]] == list(KINDS)
    for row in rows:
        assert 0.0 <= row["task_a"] <= 1.0 and 0.0 <= row["task_b"] <= 1.0
    assert all("cd_hit_rate" in r for r in rows if r["kind"] not in ("no_rehearsal", "flow"))
    assert next(r for r in rows if r["kind"] == "flow")["tau"] > 0


def test_config_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kinds"):
        RehearsalDemoConfig(kinds=("nope",))
