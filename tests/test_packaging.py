"""Packaging: the wheel ships the method cards and the callbacks' YAML snippets, ``lightning-ft config`` prints a
snippet, and the public names stay in sync between the families, ``lightning_ft`` and ``lightning_ft.callbacks``."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

import lightning_ft
import lightning_ft.callbacks as ft_callbacks
from lightning_ft.cli import main, snippet_text, snippets

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("backdoor", "memorisation", "optim", "pruning", "rehearsal")


def _public_classes(module_name: str) -> dict[str, type]:
    module = importlib.import_module(module_name)
    return {name: getattr(module, name) for name in module.__all__ if inspect.isclass(getattr(module, name))}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_public_class_of_a_family_is_importable_from_lightning_ft(family):
    for name, cls in _public_classes(f"lightning_ft.{family}").items():
        assert name in lightning_ft.__all__, f"add {name} to lightning_ft's lazy table and __all__"
        assert getattr(lightning_ft, name) is cls


def test_lazy_table_all_and_type_checking_imports_agree():
    assert sorted(lightning_ft.__all__) == sorted([*lightning_ft._LAZY, "__version__"])
    for name, module in lightning_ft._LAZY.items():
        assert name in importlib.import_module(module).__all__, f"{name} is not public in {module}"
    tree = ast.parse(Path(lightning_ft.__file__).read_text())
    checked = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_ft.")
        for alias in node.names
    }
    assert checked == lightning_ft._LAZY, "keep the TYPE_CHECKING imports in sync with _LAZY"


def test_every_public_callback_is_in_lightning_ft_callbacks():
    public = {
        name: cls
        for family in FAMILIES
        for name, cls in _public_classes(f"lightning_ft.{family}").items()
        if issubclass(cls, Callback)
    }
    assert sorted(ft_callbacks.__all__) == sorted(public)
    for name, cls in public.items():
        assert getattr(ft_callbacks, name) is cls


def test_snippets_are_the_repository_callbacks_folder():
    shipped = snippets()
    on_disk = {p.stem: p.read_text() for p in (ROOT / "callbacks").glob("*.yaml")}
    assert shipped == on_disk


def test_config_prints_a_snippet_by_class_or_stem(capsys):
    assert main(["config", "LearnedMaskPruning"]) == 0
    by_class = capsys.readouterr().out
    assert by_class == (ROOT / "callbacks" / "learned_mask_pruning.yaml").read_text()
    assert snippet_text("learned_mask_pruning") == by_class
    assert main(["config"]) == 0
    listing = capsys.readouterr().out
    assert all(stem in listing for stem in snippets())
    assert main(["config", "NoSuchCallback"]) == 2
    assert "available: activeness_aware_finetuning" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_ships_method_cards_and_snippets(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("lightning_ft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for family in FAMILIES:
        assert f"lightning_ft/{family}/README.md" in names
    for path in (ROOT / "callbacks").glob("*.yaml"):
        assert f"lightning_ft/snippets/{path.name}" in names
    assert "lightning_ft/py.typed" in names
