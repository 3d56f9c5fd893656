"""``benchmarks/rehearsal_mixcd_paper.py``: its ``--quick`` path runs end to end on the public API, and the card quotes
its committed results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "rehearsal_mixcd_paper.py"


def _block(text: str, marker: str) -> str:
    start = text.index(f"<!-- {marker}:start")
    start = text.index("-->", start) + len("-->")
    return text[start : text.index(f"<!-- {marker}:end -->")].strip()


def test_card_block_equals_the_results_file():
    card = (ROOT / "lightning_ft" / "rehearsal" / "README.md").read_text()
    expected = (ROOT / "benchmarks" / "results" / "rehearsal_mixcd_paper.md").read_text().strip()
    assert _block(card, "mixcd_paper") == expected


@pytest.mark.slow
def test_quick_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], check=True, env=env, timeout=240)
    results = json.loads((tmp_path / "rehearsal_mixcd_paper.json").read_text())
    runs = results["runs"]
    kinds = [("no_rehearsal", 0), ("random", 2), ("mixcd", 2), ("mixcd_topic", 2)]
    assert {(r["strategy"], r["budget"], r["seed"]) for r in runs} == {(*k, seed) for seed in (0, 1) for k in kinds}
    for r in runs:
        if r["budget"]:  # 64 task-B chunks, batch 32, 1 epoch: 2 steps of 2 rehearsed chunks
            assert r["rehearsed"] == 4 and 0.0 <= r["cd_hit_rate"] <= 1.0
    assert results["pool_size"] > 1.5 * (1546 - 128)  # the strided pool: training chunks plus shifted windows
    table = (tmp_path / "rehearsal_mixcd_paper.md").read_text()
    assert "mixcd at 2 chunks per batch: task-A loss" in table and "mixcd_topic at 2 chunks per batch" in table
