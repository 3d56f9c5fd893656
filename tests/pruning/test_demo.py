"""``lightning-ft demo pruning``: the fast variant runs end to end and prints one row per method."""

from __future__ import annotations

import json

import pytest

from lightning_ft.demos import DEMOS, load_demo
from lightning_ft.demos.pruning import METHODS, PruningDemoConfig, finetune, main

pytestmark = pytest.mark.slow


def test_pruning_demo_is_registered():
    assert "pruning" in DEMOS and load_demo("pruning") is main


def test_fast_demo_prints_every_method(tmp_path, capsys):
    path = tmp_path / "out.json"
    rows = main(fast=True, json_path=str(path))
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == list(METHODS)
    for method in METHODS:
        assert f"| {method} |" in out
    saved = json.loads(path.read_text())
    assert [r["method"] for r in saved["rows"]] == list(METHODS)
    for row in rows:
        assert 0.0 <= row["acc"] <= 1.0
    learned = [r for r in rows if r["method"].startswith("learned")]
    assert all(r["export"]["param_reduction"] > 0.3 for r in learned)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        finetune(PruningDemoConfig(), {}, "magnitude")
