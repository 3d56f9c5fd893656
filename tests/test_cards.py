"""Method cards quote the committed results files: the blocks that the benchmark scripts write (``results:``) or that
are copied from a results file (``flow:``) equal those files, so a card never shows numbers that no script produced."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARDS = {
    family: ROOT / "lightning_ft" / family / "README.md"
    for family in ("backdoor", "memorisation", "pruning", "rehearsal")
}


def _block(text: str, marker: str) -> str:
    start = text.index(f"<!-- {marker}:start")
    start = text.index("-->", start) + len("-->")
    return text[start : text.index(f"<!-- {marker}:end -->")].strip()


@pytest.mark.parametrize("family", sorted(CARDS))
def test_results_block_equals_the_benchmark_output(family):
    card = CARDS[family].read_text()
    assert _block(card, "results") == (ROOT / "benchmarks" / "results" / f"{family}.md").read_text().strip()


def test_flow_block_equals_the_flow_benchmarks():
    files = ("flow_digits.md", "flow_digits_sgd.md")
    expected = "\n\n".join((ROOT / "benchmarks" / "results" / name).read_text().strip() for name in files)
    assert _block(CARDS["rehearsal"].read_text(), "flow") == expected


def test_ddp_block_equals_the_stage_one_ddp_benchmark():
    expected = (ROOT / "benchmarks" / "results" / "backdoor_ddp.md").read_text().strip()
    assert _block(CARDS["backdoor"].read_text(), "ddp") == expected


def test_optim_card_quotes_the_dba_benchmark():
    expected = (ROOT / "benchmarks" / "results" / "dba.md").read_text().strip()
    assert _block((ROOT / "lightning_ft" / "optim" / "README.md").read_text(), "results") == expected
