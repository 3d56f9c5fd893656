"""The ``lightning-ft`` command line: demos and a LightningCLI that knows every lightning-ft class.

Sub-commands:

* ``lightning-ft demo`` lists the demos; ``lightning-ft demo <name> [--fast] [--json PATH]`` runs one.
* ``lightning-ft config`` lists the LightningCLI snippets shipped with the package (one per callback);
  ``lightning-ft config <name>`` prints one (by file stem, ``learned_mask_pruning``, or class, ``LearnedMaskPruning``),
  e.g. ``lightning-ft config LearnedMaskPruning > pruning.yaml``.
* ``lightning-ft fit|validate|test|predict ...`` is Lightning's :class:`~lightning.pytorch.cli.LightningCLI` (subclass
  mode for both the model and the data module). :mod:`lightning_ft.callbacks` and the demo models and data modules
  are imported first, so a YAML config can name them by class name alone::

      trainer:
        callbacks:
          - class_path: MemorisationEarlyStopping
            init_args: {max_rise: 0.1}
      model:
        class_path: CausalLMModule
      data:
        class_path: PydocTextDataModule

Example::

    lightning-ft fit --config configs/memorisation_demo.yaml --trainer.max_epochs=5
    python -m lightning_ft demo memorisation --fast
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["LIGHTNING_SUBCOMMANDS", "build_cli", "main", "snippet_text", "snippets"]

PROG = "lightning-ft"
LIGHTNING_SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI; `lightning-ft fit --help` lists the options)",
    "validate": "run one validation epoch (LightningCLI)",
    "test": "run one test epoch (LightningCLI)",
    "predict": "run inference (LightningCLI)",
}
# imported before LightningCLI parses, so that YAML can use short class names (``class_path: CausalLMModule``)
_SHORT_NAME_MODULES = (
    "lightning_ft.callbacks",
    "lightning_ft.demos.models",
    "lightning_ft.demos.text",
    "lightning_ft.demos.digits",
    "lightning_ft.demos.vision",
)


def snippets() -> dict[str, str]:
    """The LightningCLI snippets shipped with the package: file stem -> YAML text (the repository's ``callbacks/``)."""
    from importlib.resources import files

    folder = files("lightning_ft") / "snippets"
    return {p.name.removesuffix(".yaml"): p.read_text() for p in folder.iterdir() if p.name.endswith(".yaml")}


def snippet_text(name: str) -> str:
    """The snippet named ``name``: a file stem (``learned_mask_pruning``) or a callback class (``LearnedMaskPruning``).

    Raises:
        KeyError: with the available names when none matches.
    """
    available = snippets()
    if name in available:
        return available[name]
    # the one-callback snippet of that class (tsbd.yaml holds two callbacks)
    by_class = [
        text
        for text in available.values()
        if f"lightning_ft.callbacks.{name}\n" in text and text.count("class_path: lightning_ft.callbacks.") == 1
    ]
    if len(by_class) == 1:
        return by_class[0]
    raise KeyError(f"no snippet named {name!r}; available: {', '.join(sorted(available))}")


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Construct (and with ``run=True`` run) the LightningCLI behind ``lightning-ft fit|validate|test|predict``.

    Args:
        args: command-line arguments; with ``run=True`` they start with the sub-command (``["fit", "--config",
            "cfg.yaml"]``), with ``run=False`` they hold no sub-command (``["--config", "cfg.yaml"]``). None reads
            ``sys.argv[1:]``.
        run: run the sub-command (True), or only parse the arguments and instantiate the trainer, model and data
            module (False; used by tests and notebooks).

    Returns:
        The :class:`~lightning.pytorch.cli.LightningCLI`; ``cli.trainer``, ``cli.model`` and ``cli.datamodule`` are
        the instantiated objects.
    """
    for module in _SHORT_NAME_MODULES:
        importlib.import_module(module)
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"prog": PROG},
        args=None if args is None else list(args),
        run=run,
    )


def _build_parser() -> argparse.ArgumentParser:
    from lightning_ft import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tuning techniques as PyTorch Lightning callbacks: demos and a LightningCLI.",
        epilog=f"Run `{PROG} <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    demo = commands.add_parser(
        "demo",
        help="list the demos, or run one: `lightning-ft demo <name> [--fast] [--json PATH]`",
        description="Run an end-to-end demo; without a name, list the available demos.",
    )
    demo.add_argument("name", nargs="?", default=None, help="the demo to run (omit to list the demos)")
    demo.add_argument("--fast", action="store_true", help="a short smoke-test run")
    demo.add_argument("--json", dest="json_path", metavar="PATH", default=None, help="also write the results as JSON")
    config = commands.add_parser(
        "config",
        help="list the callbacks' LightningCLI snippets, or print one: `lightning-ft config <name>`",
        description="Print a callback's LightningCLI YAML snippet (every init argument with its default).",
    )
    config.add_argument("name", nargs="?", default=None, help="file stem or callback class (omit to list them)")
    for name, text in LIGHTNING_SUBCOMMANDS.items():
        # only listed here: these arguments are handed to LightningCLI before this parser sees them
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _demo(name: str | None, fast: bool, json_path: str | None) -> int:
    from lightning_ft.demos import DEMOS, load_demo

    if name is None:
        width = max(map(len, DEMOS), default=0)
        print("available demos (run one with `lightning-ft demo <name> [--fast]`):")
        for demo_name, (description, _) in sorted(DEMOS.items()):
            print(f"  {demo_name:<{width}}  {description}")
        return 0
    try:
        entry = load_demo(name)
    except KeyError as err:
        return _error(str(err.args[0]) if err.args else f"unknown demo {name!r}")
    except ImportError as err:
        print(f"{PROG}: error: demo {name!r} needs a missing package: {err}", file=sys.stderr)
        return 1
    entry(fast=fast, json_path=json_path)
    return 0


def _config(name: str | None) -> int:
    if name is None:
        print("callback snippets (print one with `lightning-ft config <name>`):")
        for stem in sorted(snippets()):
            print(f"  {stem}")
        return 0
    try:
        text = snippet_text(name)
    except KeyError as err:
        return _error(str(err.args[0]))
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-ft`` and ``python -m lightning_ft``.

    Args:
        argv: the arguments after the program name (None reads ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad arguments (argparse and LightningCLI errors raise ``SystemExit(2)``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in LIGHTNING_SUBCOMMANDS:
        # argv=None: LightningCLI reads sys.argv itself (given both, it warns that they may disagree)
        build_cli(None if argv is None else args, run=True)
        return 0
    namespace = _build_parser().parse_args(args)
    if namespace.command == "demo":
        return _demo(namespace.name, namespace.fast, namespace.json_path)
    if namespace.command == "config":
        return _config(namespace.name)
    return _error(f"unknown command {namespace.command!r}")  # pragma: no cover - argparse rejects it first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
