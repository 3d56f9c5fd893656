"""Build and execute the notebooks (``python notebooks/build.py [name ...]``; needs ``pip install -e .[notebooks]``).

Each notebook is written from the cell lists below with nbformat and executed in place with nbclient, so the
committed ``.ipynb`` files always hold outputs produced by the current code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "memorisation": [
        (
            "markdown",
            "# Memorisation during fine-tuning: monitor, early stopping, regulariser\n\n"
            "A tiny GPT-2 (2 layers, width 128) is pre-trained on one half of CPython's pydoc topics, then fine-tuned"
            " for 30 epochs on 32 chunks (64 tokens) of the other half, the regime where it memorises. Every run"
            " carries a `MemorisationMonitor` (probe = the 32 training chunks, 32-token prompt, 32-token suffix);"
            " we compare plain fine-tuning, `MemorisationEarlyStopping(max_rise=0.10)` (weights at the stop), the"
            " same with `restore_best=True, val_monitor='val_loss'` (\"best n-gram\") and the n-gram regulariser"
            " (lambda 3, gamma 0.5). Runs on 2 CPU cores in about 2 minutes.",
        ),
        (
            "code",
            "import logging\n"
            "import warnings\n\n"
            "import matplotlib.pyplot as plt\n\n"
            "from lightning_ft.demos.memorisation import KINDS, MemorisationDemoConfig, finetune, format_table,"
            " pretrained_base\n\n"
            'warnings.filterwarnings("ignore")\n'
            'logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)\n'
            'logging.getLogger("lightning.fabric").setLevel(logging.ERROR)\n'
            "config = MemorisationDemoConfig()\n"
            "base = pretrained_base(config, verbose=False)\n"
            "runs = {kind: finetune(kind, config, base) for kind in KINDS}",
        ),
        ("code", "from IPython.display import Markdown\n\nMarkdown(format_table(list(runs.values())))"),
        (
            "code",
            "fig, axes = plt.subplots(1, 3, figsize=(15, 4))\n"
            "for kind, run in runs.items():\n"
            "    checks = run.history[1:]  # skip the step-0 entry: epoch-end checks only\n"
            '    epochs = [h["epoch"] + 1 for h in checks]\n'
            '    axes[0].plot(epochs, [h["ngram"] for h in checks], label=kind)\n'
            '    axes[1].plot(epochs, [h["exact"] for h in checks], label=kind)\n'
            '    val_epochs = [h["epoch"] + 1 for h in run.val_history]\n'
            '    axes[2].plot(val_epochs, [h["val_loss"] for h in run.val_history], label=kind)\n'
            'titles = ["mem/ngram (n = 4, 5, 6)", "mem/exact (32-token suffix)", "validation loss"]\n'
            "for ax, title in zip(axes, titles, strict=True):\n"
            "    ax.set_title(title)\n"
            '    ax.set_xlabel("epoch")\n'
            "    ax.legend()\n"
            "fig.tight_layout()",
        ),
        (
            "markdown",
            "**Reading the plots.** On this tiny setup validation loss rises from the first epoch (32 training"
            " chunks, large learning rate), so a validation-based stop would also end early; what the monitor shows"
            " is *when* memorisation sets in: the n-gram score leaves zero several epochs before the first exact"
            " 32-token extraction, as the paper reports. `MemorisationEarlyStopping` stops when `mem/ngram` has"
            ' risen 0.10 above the starting model, before any suffix is extracted; "best n-gram" then restores'
            " the best-validation weights inside that bound (here the first epoch's). The regulariser trains all 30"
            " epochs but memorises markedly less, at a validation loss no worse than plain fine-tuning; the Goldfish"
            " baseline memorises even less at this setting but ends with the worst validation loss (see the"
            " benchmark's sweep for regulariser settings that beat it on both)."
            " `benchmarks/memorisation.py` has the sweep and the timings.",
        ),
    ],
}


def build(name: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in NOTEBOOKS[name]:
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        nb.cells.append(cell)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for notebook in sys.argv[1:] or sorted(NOTEBOOKS):
        print(build(notebook))
