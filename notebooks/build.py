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
    "backdoor": [
        (
            "markdown",
            "# Backdoor removal with TSBD: neuron-weight-change reinitialisation + activeness-aware fine-tuning\n\n"
            "**Attack.** scikit-learn's digits are upsampled to 16x16 and split 70/30 into train and test. A BadNets"
            " 3x3 patch is stamped on 10% of the training images, relabelled to the target class 0, and a small"
            " BatchNorm CNN (three 3x3 convs, 112 conv neurons) is trained on the poisoned split for 30 epochs.\n\n"
            "**Defender.** It holds 5% of the training split as clean data (62 images, none poisoned) and fine-tunes"
            " the backdoored model on it with SGD (lr 0.01, 20 epochs; TSBD runs 21 epochs, the official loop's"
            " `range(ft_epoch + 1)`). The defenses compared:\n\n"
            "* `vanilla_ft`: plain fine-tuning on the clean images.\n"
            "* `stage1_only`: TSBD stage 1 alone (`NeuronWeightChangeReinit`): a *copy* of the model is unlearned on"
            " the clean data (gradient ascent on cross-entropy, lr_unlearn 1e-3, until clean accuracy collapses); the"
            " `neuron_ratio` = 0.3 conv neurons whose weights changed most (NWC, L1 over each output channel) are"
            " selected and, among their weights, the 70% with the largest change are zeroed in the original model.\n"
            "* `stage1_ft`: stage 1, then plain fine-tuning (the paper's ablation of stage 2).\n"
            "* `tsbd_penalty`: stage 1, then activeness-aware fine-tuning (`ActivenessAwareFineTuning`,"
            ' `mode="penalty"`): the gradient-norm penalty, approximated with a second forward/backward pass at a'
            " perturbed point (alpha 0.7, r 0.05), which damps the updates of highly active (backdoor) neurons.\n"
            '* `tsbd_clip`: stage 1, then the one-pass variant (`mode="clip"`): each neuron\'s gradient norm is'
            " capped at its layer's median neuron gradient norm.\n\n"
            "Metrics, as in BackdoorBench: clean accuracy (C-ACC), attack success rate (ASR) and robust accuracy (RA,"
            " true label predicted) on the triggered non-target test images, and the defense effectiveness rating"
            " (DER, 0.5 = no change). Runs on 2 CPU cores in a few minutes.",
        ),
        (
            "code",
            "import logging\n"
            "import warnings\n\n"
            'warnings.filterwarnings("ignore")  # before the imports below (tqdm warns when ipywidgets is missing)\n\n'
            "import matplotlib.pyplot as plt\n"
            "import torch\n"
            "from IPython.display import Markdown\n\n"
            "from lightning_ft.backdoor import defense_effectiveness_rating, find_neuron_layers\n"
            "from lightning_ft.demos.backdoor import BackdoorDemoConfig, StageTracker, defend, evaluate_state,"
            " format_table, prepare\n"
            "from lightning_ft.demos.vision import ImageClassifier\n\n"
            'logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)\n'
            'logging.getLogger("lightning.fabric").setLevel(logging.ERROR)\n'
            "config = BackdoorDemoConfig()  # badnets, bn_cnn, seed 0, neuron_ratio 0.3\n"
            "setup = prepare(config)  # trains the backdoored model\n"
            "before = evaluate_state(config, setup)\n"
            'print(f"clean images for the defender: {len(setup.clean)};'
            ' backdoor training: {setup.attack_seconds:.1f} s")\n'
            "print(f\"backdoored model: C-ACC {before['acc']:.3f}, ASR {before['asr']:.3f}, RA {before['ra']:.3f}\")",
        ),
        (
            "code",
            'FT_KINDS = ("vanilla_ft", "stage1_ft", "tsbd_penalty", "tsbd_clip")\n'
            "rows, histories = {}, {}\n"
            "for kind in FT_KINDS:\n"
            "    tracker = StageTracker(setup)  # C-ACC and ASR at train start and after every epoch\n"
            "    rows[kind] = defend(config, setup, kind, extra_callbacks=[tracker])\n"
            "    histories[kind] = tracker.history\n"
            'rows["stage1_only"] = defend(config, setup, "stage1_only")\n'
            "for row in rows.values():\n"
            '    row["der"] = defense_effectiveness_rating(before["asr"], row["asr"], before["acc"], row["acc"])\n'
            'order = ["vanilla_ft", "stage1_only", "stage1_ft", "tsbd_penalty", "tsbd_clip"]\n'
            'Markdown(format_table([{**before, "der": 0.5}, *(rows[kind] for kind in order)]))',
        ),
        (
            "code",
            "# stage 1 of each TSBD run: unlearning epochs, stop rule, neurons (selected), weights zeroed\n"
            'for kind in ["stage1_only", "stage1_ft", "tsbd_penalty", "tsbd_clip"]:\n'
            "    print(f\"{kind:>13}: {rows[kind]['stage1']}\")",
        ),
        (
            "markdown",
            "## What to look at\n\n"
            "* **Trajectories.** Epoch 0 of a `vanilla_ft` run is the backdoored model itself; epoch 0 of a TSBD run"
            " (`stage1_ft`, `tsbd_penalty`, `tsbd_clip`, marked with a circle) is the model *right after stage 1*,"
            " before any fine-tuning step (the `stage1_only` row of the table). Compare it with the backdoored"
            " model (dashed lines): zeroing the selected weights damages the backdoor and clean accuracy together."
            " Fine-tuning then has to restore the accuracy without letting the ASR climb back; compare the TSBD"
            " runs with `vanilla_ft`, which fine-tunes the intact backdoored model on the same clean images, and"
            " the stage-2 variants (penalty, clipping) with plain fine-tuning after stage 1 (`stage1_ft`).\n"
            "* **NWC distribution.** The second figure shows what stage 1 selects on: under clean unlearning a small"
            " set of neurons moves far more than the rest, and the selection threshold (top 30%) includes that"
            " tail.",
        ),
        (
            "code",
            "fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))\n"
            "for kind, history in histories.items():\n"
            '    epochs = [h["epoch"] for h in history]\n'
            '    for ax, key in zip(axes, ["asr", "acc"], strict=True):\n'
            "        ax.plot(epochs, [h[key] for h in history], label=kind)\n"
            'for ax, key in zip(axes, ["asr", "acc"], strict=True):  # epoch 0 of a TSBD run: right after stage 1\n'
            '    stage1 = [histories[kind][0][key] for kind in histories if kind != "vanilla_ft"]  # the same for all\n'
            '    ax.plot([0] * len(stage1), stage1, "ko", markersize=7, zorder=3, label="after stage 1")\n'
            'titles = ["attack success rate (triggered non-target test images)", "clean accuracy (test)"]\n'
            'for ax, key, title in zip(axes, ["asr", "acc"], titles, strict=True):\n'
            '    ax.axhline(before[key], color="gray", linestyle="--", label="backdoored model")\n'
            "    ax.set_title(title)\n"
            '    ax.set_xlabel("fine-tuning epoch (0 = before the first step)")\n'
            "    ax.set_ylim(-0.03, 1.03)\n"
            "    ax.legend()\n"
            "fig.tight_layout()",
        ),
        (
            "markdown",
            "## Neuron weight changes under clean unlearning\n\n"
            "Every conv neuron's NWC (L1 norm of its weights' change between the backdoored model and its"
            " clean-unlearned copy), from the `tsbd_penalty` run's stage 1. The red line is the selection threshold:"
            " the neurons at or right of it (the top `neuron_ratio` = 30%, ranked over all layers together) have"
            " their largest-change weights zeroed. The bars are stacked by layer, so the colours show which layers"
            " the selected neurons come from. The distribution has a long right tail: a small set of neurons"
            " changes far more than the bulk under clean unlearning, the neurons the paper links to the backdoor;"
            " with `neuron_ratio` = 0.3 the selection also takes in the upper part of the bulk.",
        ),
        (
            "code",
            'nwc = torch.tensor(rows["tsbd_penalty"]["nwc"])  # every conv neuron, in layer order\n'
            "n_top = int(len(nwc) * config.neuron_ratio)\n"
            "threshold = nwc.sort(descending=True).values[n_top - 1].item()\n"
            "layers = find_neuron_layers(ImageClassifier(arch=config.arch))  # the convs stage 1 ranks\n"
            "per_layer = torch.split(nwc, [layer.num_neurons for layer in layers])\n"
            "fig, ax = plt.subplots(figsize=(8, 4))\n"
            "ax.hist(\n"
            "    [values.numpy() for values in per_layer],\n"
            "    bins=40,\n"
            "    stacked=True,\n"
            '    label=[f"{layer.name} ({layer.num_neurons} neurons)" for layer in layers],\n'
            ")\n"
            'ax.axvline(threshold, color="red", label=f"threshold: top {n_top} of {len(nwc)} neurons")\n'
            'ax.set_xlabel("neuron weight change (L1)")\n'
            'ax.set_ylabel("neurons")\n'
            'ax.set_title("NWC of every conv neuron under clean unlearning")\n'
            "ax.legend()\n"
            "fig.tight_layout()\n"
            'print(f"NWC: median {nwc.median():.3g}, threshold {threshold:.3g}, max {nwc.max():.3g}")',
        ),
    ],
    "pruning": [
        (
            "markdown",
            "# Learned channel masks vs Lightning's ModelPruning\n\n"
            "scikit-learn's digits at 16x16; a BN-CNN (conv 32-64-128, GAP, linear head) is trained dense for 15"
            " epochs with Adam, then fine-tuned 5 more epochs while pruning a share of the channels of its three"
            " conv/BatchNorm layers, at 30%, 50%, 70% and 80%. Lightning's `ModelPruning` (L1-structured on the"
            " convs) prunes once after the first epoch, or gradually over the first three epochs;"
            " `LearnedMaskPruning` learns one gate per BatchNorm channel (sigmoid with straight-through scores, or"
            " HardConcrete) and reaches the target on a cubic schedule by 60% of the fine-tuning. The learned"
            " models are exported (channels removed). One seed; about 4 minutes on 2 CPU cores.",
        ),
        (
            "code",
            "import logging\n"
            "import warnings\n\n"
            "import matplotlib.pyplot as plt\n\n"
            "from lightning_ft.demos.pruning import METHODS, PruningDemoConfig, finetune, pretrain\n\n"
            'warnings.filterwarnings("ignore")\n'
            'logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)\n'
            "config = PruningDemoConfig()\n"
            "state = pretrain(config)\n"
            'dense = finetune(config, state, "dense")\n'
            "sparsities = [0.3, 0.5, 0.7, 0.8]\n"
            "runs = {\n"
            "    (method, s): finetune(PruningDemoConfig(sparsity=s), state, method) for s in sparsities for method in"
            " METHODS[1:]\n"
            "}\n"
            "print(f\"dense fine-tuning: test accuracy {dense['acc']:.3f}\")",
        ),
        (
            "code",
            "fig, axes = plt.subplots(1, 2, figsize=(12, 4))\n"
            "for method in METHODS[1:]:\n"
            '    axes[0].plot(sparsities, [runs[method, s]["acc"] for s in sparsities], "o-", label=method)\n'
            'axes[0].axhline(dense["acc"], color="gray", ls="--", label="dense")\n'
            'axes[0].set(xlabel="channel sparsity", ylabel="test accuracy", title="accuracy after pruning")\n'
            "axes[0].legend()\n"
            'for method in ("learned", "learned_hc"):\n'
            '    params = [runs[method, s]["export"]["params_after"] for s in sparsities]\n'
            '    flops = [runs[method, s]["export"]["flops_after"] / 1e6 for s in sparsities]\n'
            '    axes[1].plot(params, flops, "o-", label=method)\n'
            'axes[1].set(xlabel="parameters (exported)", ylabel="MFLOPs per image", title="exported model size")\n'
            "axes[1].legend()\n"
            "fig.tight_layout()",
        ),
        (
            "code",
            "from IPython.display import Markdown\n\n"
            'header = "| sparsity | " + " | ".join(METHODS[1:]) + " |\\n|---:|" + "---:|" * len(METHODS[1:])\n'
            'rows = [f"| {s:.0%} | " + " | ".join(f"{runs[m, s][\'acc\']:.3f}" for m in METHODS[1:]) + " |" for s in'
            " sparsities]\n"
            'Markdown("\\n".join([header, *rows]))',
        ),
        (
            "markdown",
            "**Reading the plots.** One-shot magnitude pruning of the convs holds up at 30% but collapses as the"
            " sparsity grows: the pruned conv channels still emit their BatchNorm's `beta`, and four epochs do not"
            " repair the network. The learned masks pick the channels from the task's gradient while the sparsity"
            " rises, and end with a model whose pruned channels are exactly zero, so the exported network is"
            " genuinely smaller. `benchmarks/pruning.py` repeats this over seeds, on timm's `test_resnet` and on a"
            " tiny GPT-2's MLP neurons.",
        ),
    ],
    "rehearsal": [
        (
            "markdown",
            "# Forgetting and rehearsal: mix-cd, its baselines and FLOW\n\n"
            "An MLP learns task A (scikit-learn digits, 8x8, 1,200 training images), then fine-tunes 15 epochs on task"
            " B: inverted digits with labels shifted by 3, a task that overwrites what it knew. The runs:\n\n"
            "* `no_rehearsal`: plain fine-tuning on task B.\n"
            "* `flow`: FLOW, the task-B loss weighted by `exp(-ref_loss / median)` from the task-A model.\n"
            "* rehearsal with a `RehearsalDataModule` + `RehearsalFeedback`: a few task-A training images mixed into"
            " every batch of 32, drawn `random`ly, by `loss_priority`, or by `mixcd` (bins of the task-A model's loss,"
            " drawn by their estimated collateral-damage rate: the share of rehearsed samples the task-A model got"
            " right and the current model gets wrong), and `flow_mixcd` (both).\n\n"
            "Each run is repeated at 2 and 4 rehearsed samples per batch (6% and 11% of each batch). One seed here;"
            " `benchmarks/rehearsal.py` pairs 8 seeds. Runs on 2 CPU cores in about a minute.",
        ),
        (
            "code",
            "import warnings\n\n"
            'warnings.filterwarnings("ignore")\n\n'
            "import matplotlib.pyplot as plt\n"
            "from IPython.display import Markdown\n\n"
            "from lightning_ft.demos._common import prepare_demo_process\n"
            "from lightning_ft.demos.rehearsal import (\n"
            "    RehearsalDemoConfig,\n"
            "    _accuracy,\n"
            "    _data,\n"
            "    finetune,\n"
            "    format_table,\n"
            "    pretrain,\n"
            ")\n"
            "from lightning_ft.demos.vision import ImageClassifier\n\n"
            "prepare_demo_process()\n"
            "config = RehearsalDemoConfig()\n"
            "data = _data(config)\n"
            "state = pretrain(config, data)\n"
            'base = ImageClassifier(arch="mlp", lr=config.lr, seed=config.seed)\n'
            "base.load_state_dict(state)\n"
            'before = _accuracy(base, *data["test_a"])\n'
            'rows = [finetune(config, data, state, kind) | {"budget": 0} for kind in ("no_rehearsal", "flow")]\n'
            "for budget in (2, 4):\n"
            "    budget_config = RehearsalDemoConfig(replay_per_step=budget)\n"
            '    for kind in ("random", "loss_priority", "mixcd", "flow_mixcd"):\n'
            '        rows.append(finetune(budget_config, data, state, kind) | {"budget": budget})\n'
            'print(f"task-A accuracy before fine-tuning: {before:.3f}")',
        ),
        (
            "code",
            "table_rows = [r | {\"kind\": f\"{r['kind']} ({r['budget']})\"} for r in rows]\n"
            "Markdown(format_table(table_rows, before))",
        ),
        (
            "markdown",
            "**What to look at.** Each point is one run: up and to the right is better (more of task A kept, task B"
            " learned as well). Rehearsal moves runs up by far more than any choice between strategies; compare the"
            " strategies at the same budget (same marker).",
        ),
        (
            "code",
            "fig, ax = plt.subplots(figsize=(7, 5))\n"
            'markers = {0: "o", 2: "s", 4: "^"}\n'
            "for r in rows:\n"
            '    ax.scatter(r["task_b"], r["task_a"], marker=markers[r["budget"]], s=60)\n'
            "    ax.annotate(\n"
            "        f\"{r['kind']} ({r['budget']})\",\n"
            '        (r["task_b"], r["task_a"]),\n'
            "        fontsize=8,\n"
            "        xytext=(4, 4),\n"
            '        textcoords="offset points",\n'
            "    )\n"
            'ax.axhline(before, ls="--", c="grey", label="task A before fine-tuning")\n'
            'ax.set_xlabel("task-B accuracy")\n'
            'ax.set_ylabel("task-A accuracy after fine-tuning (retention)")\n'
            'ax.set_title("retention vs task accuracy (marker: rehearsed samples per batch)")\n'
            "ax.legend()\n"
            "fig.tight_layout()",
        ),
    ],
}


def build(name: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in NOTEBOOKS[name]:
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        nb.cells.append(cell)
    NotebookClient(nb, timeout=2400, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for notebook in sys.argv[1:] or sorted(NOTEBOOKS):
        print(build(notebook))
