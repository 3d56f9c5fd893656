"""Wall time of TSBD's stage 1 with 1 and 2 CPU processes (DDP, gloo) on the same clean set.

Stage 1 unlearns a copy of the model on the clean data and, with ``neuron_ratio="auto"``, runs the calibration's repair
probes. Under DDP every rank works on its shard (data-parallel unlearning, folds shared out over ranks); before, rank
0 ran both alone while the others waited. Two models: timm's tiny ``test_resnet`` on 16x16 digits (a step takes
milliseconds: the per-step gradient all-reduce dominates) and timm's ``resnet18`` on 32x32 digits (compute-bound, as
real fine-tuning is). Each is trained once on 700 clean images and saved; each run loads it and runs stage 1 on the
other 1,024 images (batch 256, the official code's), with a fixed number of unlearning epochs (the stop rules off) so
that both runs do the same work, one thread per process. Rows: the unlearning alone (a fixed ``neuron_ratio``) and
the unlearning plus the ``auto`` calibration (3 candidates, 4 folds, 2 probe epochs).

Writes ``benchmarks/results/backdoor_ddp.json`` and ``.md``, and the method card's ``ddp`` block.

Usage: python benchmarks/backdoor_ddp.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_into_card  # noqa: E402

from lightning_ft.backdoor import NeuronWeightChangeReinit  # noqa: E402
from lightning_ft.demos._common import cpu_trainer  # noqa: E402
from lightning_ft.demos.digits import load_digits_tensors  # noqa: E402
from lightning_ft.demos.vision import ImageClassifier  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CARD = ROOT / "lightning_ft" / "backdoor" / "README.md"
# the official code's batch 256: the gradient all-reduce per step costs the same whatever the batch, the compute not
N_TRAIN, N_CLEAN, BATCH, UNLEARN_EPOCHS = 700, 1024, 256, 5
VARIANTS: dict[str, dict[str, Any]] = {
    "unlearning": {"neuron_ratio": 0.1},
    "unlearning + auto calibration": {
        "neuron_ratio": "auto",
        "calibration_candidates": [0.01, 0.05, 0.1],
        "calibration_folds": 4,
        "calibration_epochs": 2,
        "max_acc_drop": 1.0,  # every candidate passes: the same work in every run
    },
}


MODELS = {"test_resnet": 16, "resnet18": 32}  # timm model -> digits image size


def _model(arch: str) -> ImageClassifier:
    return ImageClassifier(arch=arch, lr=0.05, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(arch: str, devices: int, variant: str, state: Path, out: Path) -> None:
    torch.set_num_threads(1)
    x, y = load_digits_tensors(MODELS[arch])
    clean = TensorDataset(x[N_TRAIN : N_TRAIN + N_CLEAN], y[N_TRAIN : N_TRAIN + N_CLEAN])
    module = _model(arch)
    module.load_state_dict(torch.load(state))
    module.lr = 0.0  # the fit after stage 1 is not what is timed
    stage1 = NeuronWeightChangeReinit(
        **VARIANTS[variant],
        lr_unlearn=1e-3,
        max_unlearn_epochs=UNLEARN_EPOCHS,
        unlearn_stop_acc=0.0,
        stop_on_single_class=False,
        progress_bar=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stage1],
    )
    try:
        trainer.fit(module, DataLoader(clean, batch_size=BATCH))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.global_rank == 0:
        report = {k: v for k, v in stage1.report.items() if k != "calibration"}
        out.write_text(json.dumps({"seconds": stage1.seconds, "report": report}))


def run(arch: str, devices: int, variant: str, state: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{arch}_{devices}_{variant.replace(' ', '_')}.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, __file__, "--worker", "--arch", arch, "--devices", str(devices), "--variant", variant]
    cmd += ["--state", str(state), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"**Stage 1 with 2 ranks** (DDP on CPU, gloo, one thread per process; {N_CLEAN} clean digits, batch {BATCH},"
        f" {UNLEARN_EPOCHS} unlearning epochs; median of {results['repeats']} interleaved runs)\n",
        "| model | stage 1 | 1 rank (s) | 2 ranks (s) | 2 ranks / 1 rank |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        model = f"{row['arch']} ({MODELS[row['arch']]}x{MODELS[row['arch']]})"
        lines.append(f"| {model} | {row['variant']} | {row['1']:.2f} | {row['2']:.2f} | {row['ratio']:.2f}x |")
    lines.append(f"\nMachine: {results['machine']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--arch", default="test_resnet", choices=sorted(MODELS))
    parser.add_argument("--variant", default="unlearning")
    parser.add_argument("--state", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args.arch, args.devices, args.variant, args.state, args.out)
        return
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = []
        for arch, size in MODELS.items():
            x, y = load_digits_tensors(size)
            module = _model(arch)
            loader = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=64, shuffle=True)
            cpu_trainer(5).fit(module, loader)
            state = workdir / f"{arch}.pt"
            torch.save(module.state_dict(), state)
            for variant in VARIANTS:
                times: dict[int, list[float]] = {1: [], 2: []}
                reports = {}
                for _ in range(args.repeats):
                    for devices in (1, 2):  # interleaved
                        result = run(arch, devices, variant, state, workdir)
                        times[devices].append(result["seconds"])
                        reports[devices] = result["report"]
                one, two = sorted(times[1])[len(times[1]) // 2], sorted(times[2])[len(times[2]) // 2]
                row = {"arch": arch, "variant": variant, "1": one, "2": two, "ratio": two / one}
                rows.append({**row, "times": times, "reports": reports})
                print(f"{arch} {variant}: 1 rank {one:.2f} s, 2 ranks {two:.2f} s ({two / one:.2f}x)", flush=True)
    cpu = platform.processor() or platform.machine()
    results = {
        "machine": f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}",
        "repeats": args.repeats,
        "rows": rows,
        "seconds_total": time.process_time(),
    }
    (RESULTS / "backdoor_ddp.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "backdoor_ddp.md").write_text(markdown(results) + "\n")
    write_into_card(CARD, markdown(results), marker="ddp")
    print(markdown(results))


if __name__ == "__main__":
    main()
