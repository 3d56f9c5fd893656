"""Test-suite defaults: W&B is a no-op and Hugging Face never reaches the network (tests may override both)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory: files a fit writes relative to the working directory (Lightning's
    ``default_root_dir``, MemorisationEarlyStopping's best weights) never land in the repository or in another test's
    way. Tests reach repository files through paths built from ``__file__``."""
    monkeypatch.chdir(tmp_path)
