"""Run a standalone script under Lightning's ``strategy="ddp"`` with 2 CPU processes (gloo) and read its output.

``ddp`` re-launches ``sys.argv`` for rank 1, which cannot work inside pytest (Lightning #3957), so DDP tests write a
script in ``tests/scripts/`` that trains, and each rank dumps JSON to ``--out``; the test compares the ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["SCRIPTS", "find_free_port", "load_script", "run_ddp_script"]

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """``tests/scripts/<name>.py`` imported as a module (to reuse its data and models in a one-process reference)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ddp_script(
    script: str, out_dir: Path, *args: str, devices: int = 2, timeout: float = 300
) -> list[dict[str, Any]]:
    """Run ``tests/scripts/<script>`` with ``--devices`` and ``--out``; return each rank's JSON (rank order).

    The script must write ``<out>/rank{global_rank}.json`` from every rank.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS"):
        env.pop(var, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPTS / script), "--devices", str(devices), "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    results = []
    for rank in range(devices):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            raise AssertionError(f"{script}: rank {rank} wrote no {path.name}:\n{proc.stderr[-3000:]}")
        results.append(json.loads(path.read_text()))
    return results
