"""The ``lightning-ft`` command line: callback snippets, the demo config, the ``demo`` sub-command, ``python -m``."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

import lightning_ft.cli as cli_module
from lightning_ft.cli import build_cli, main
from lightning_ft.demos.models import CausalLMModule
from lightning_ft.demos.text import PydocTextDataModule
from lightning_ft.memorisation.callbacks import MemorisationEarlyStopping, MemorisationMonitor

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = sorted((ROOT / "callbacks").glob("*.yaml"))
DEMO_CONFIG = ROOT / "configs" / "memorisation_demo.yaml"
# quiet, fast trainer settings shared by the parsing tests
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# a one-epoch, two-batch fit of the demo's tiny GPT-2 on 8 pydoc chunks
SHORT_FIT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--data.n_train=8",
    "--data.n_val=8",
    "--data.batch_size=4",
    "--model.n_embd=32",
    "--model.n_layer=1",
    "--model.n_head=2",
]


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide pytest's own arguments from LightningCLI (it warns when both ``args`` and ``sys.argv`` are given)."""
    monkeypatch.setattr(sys, "argv", ["lightning-ft"])


def _plain(value: Any) -> Any:
    """Tuples as lists (YAML has no tuples), recursively."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _snippet_callbacks(path: Path) -> list[dict[str, Any]]:
    callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    assert isinstance(callbacks, list) and callbacks, f"{path.name}: trainer.callbacks must be a non-empty list"
    return callbacks


def test_snippets_exist() -> None:
    names = {p.name for p in SNIPPETS}
    assert {"memorisation_monitor.yaml", "memorisation_early_stopping.yaml"} <= names
    assert (ROOT / "callbacks" / "README.md").is_file()


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_callback_snippet_instantiates_with_its_values(path: Path, tmp_path: Path) -> None:
    cli = LightningCLI(
        BoringModel,
        run=False,
        args=["--config", str(path), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *QUIET],
    )
    instances = list(cli.trainer.callbacks)
    for entry in _snippet_callbacks(path):
        cls = _import(entry["class_path"])
        matches = [cb for cb in instances if type(cb) is cls]
        assert matches, f"{path.name}: no {cls.__name__} among {instances}"
        callback = matches[0]
        instances.remove(callback)  # a second entry of the same class matches the next instance
        for key, value in (entry.get("init_args") or {}).items():
            assert _plain(getattr(callback, key)) == _plain(value), f"{path.name}: {cls.__name__}.{key}"


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_callback_snippet_lists_every_argument_with_its_default(path: Path) -> None:
    for entry in _snippet_callbacks(path):
        cls = _import(entry["class_path"])
        params = {
            name: p
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        init_args = entry.get("init_args") or {}
        assert list(init_args) == list(params), f"{path.name}: arguments differ from {cls.__name__}'s signature"
        for name, value in init_args.items():
            assert _plain(value) == _plain(params[name].default), f"{path.name}: {name} is not the default"


def test_short_class_names(tmp_path: Path) -> None:
    cli = build_cli(
        [
            "--model=CausalLMModule",
            "--model.n_embd=32",
            "--model.n_layer=1",
            "--model.n_head=2",
            "--data=PydocTextDataModule",
            "--trainer.callbacks+=MemorisationMonitor",
            "--trainer.callbacks.probe_size=16",
            "--trainer.callbacks+=MemorisationEarlyStopping",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        run=False,
    )
    assert type(cli.model) is CausalLMModule and type(cli.datamodule) is PydocTextDataModule
    mems = [cb for cb in cli.trainer.callbacks if isinstance(cb, MemorisationMonitor)]
    assert [type(cb) for cb in mems] == [MemorisationMonitor, MemorisationEarlyStopping]
    assert mems[0].probe_size == 16 and mems[1].probe_size == 512


def test_demo_config_parses() -> None:
    cli = build_cli(["--config", str(DEMO_CONFIG), *QUIET], run=False)
    assert type(cli.model) is CausalLMModule
    assert cli.model.lr == pytest.approx(3e-3)
    assert type(cli.datamodule) is PydocTextDataModule
    assert (cli.datamodule.n_train, cli.datamodule.batch_size) == (32, 8)
    assert cli.datamodule.vocab_size == cli.model.hparams.vocab_size
    assert cli.datamodule.seq_len >= 64  # prefix_len + suffix_len
    assert cli.trainer.max_epochs == 30
    assert type(cli.trainer.accelerator).__name__ == "CPUAccelerator"
    (stopper,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MemorisationEarlyStopping)]
    assert (stopper.prefix_len, stopper.suffix_len, stopper.max_rise) == (32, 32, pytest.approx(0.1))


def test_demo_config_fits(tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(DEMO_CONFIG),
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT_FIT,
            "--trainer.callbacks.probe_size=4",
            "--trainer.callbacks.batch_size=4",
            *QUIET,
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    (stopper,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MemorisationEarlyStopping)]
    assert stopper.probe is not None and len(stopper.probe) == 4
    assert [h["step"] for h in stopper.history] == [0, 2]  # the step-0 baseline and the end of epoch 0
    for key in ("mem/ngram", "mem/exact", "mem/token_acc", "val_loss"):
        assert key in cli.trainer.callback_metrics
    assert list(tmp_path.rglob("config.yaml")), "LightningCLI saves the merged config next to the logs"


def test_main_dispatches_lightning_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], bool]] = []
    monkeypatch.setattr(cli_module, "build_cli", lambda args, run=True: calls.append((list(args), run)))
    for command in ("fit", "validate", "test", "predict"):
        assert main([command, "--config", "x.yaml"]) == 0
    assert calls == [([c, "--config", "x.yaml"], True) for c in ("fit", "validate", "test", "predict")]


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "fit", "validate", "test", "predict"):
        assert command in out


def test_demo_lists_demos(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_ft.demos import DEMOS

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for name, (description, _) in DEMOS.items():
        assert name in out and description in out
    assert "memorisation" in out


def test_demo_runs_the_entry_with_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lightning_ft.demos

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(lightning_ft.demos, "load_demo", lambda name: lambda **kwargs: calls.append(kwargs))
    json_path = str(tmp_path / "out.json")
    assert main(["demo", "memorisation", "--fast", "--json", json_path]) == 0
    assert main(["demo", "memorisation"]) == 0
    assert calls == [{"fast": True, "json_path": json_path}, {"fast": False, "json_path": None}]


def test_unknown_demo_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lightning-ft: error: unknown demo 'nope'")
    assert "memorisation" in lines[0] and "Traceback" not in captured.err


@pytest.mark.parametrize(
    "argv",
    [["demo", "--bad"], ["demo", "memorisation", "extra"], ["nope"], [], ["fit", "--bogus=1"]],
    ids=["flag", "extra", "cmd", "none", "fit-flag"],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_python_m_lightning_ft_demo() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_ft", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "memorisation" in result.stdout


def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "callbacks" / "README.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(lang + "\n")]


def test_callbacks_readme_composed_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `my.yaml` composed with a snippet, run with its first command (plus settings that make it short)."""
    (my_yaml,) = [block for block in _readme_blocks("yaml") if block.startswith("# my.yaml")]
    command = _readme_blocks("bash")[0].splitlines()[0].split()
    assert command[:2] == ["lightning-ft", "fit"], command
    monkeypatch.chdir(tmp_path)
    (tmp_path / "callbacks").symlink_to(ROOT / "callbacks")
    (tmp_path / "my.yaml").write_text(my_yaml)
    cli = build_cli([*command[1:], *SHORT_FIT, f"--trainer.default_root_dir={tmp_path}", *QUIET])
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "MemorisationMonitor" in names and "LearningRateMonitor" in names
    assert cli.trainer.state.finished and "mem/ngram" in cli.trainer.callback_metrics
