"""Effect on a real small run: FLOW weighting keeps more of task A than plain fine-tuning on task B.

The pipeline is the rehearsal demo's (``lightning_ft.demos.rehearsal``, also the benchmark's): an MLP learns digits
(task A, 1,200 images, SGD 0.05, 30 epochs), then fine-tunes 15 epochs on 600 inverted digits with labels shifted by
3 (task B), either plainly or with FLOW's static weights ``exp(-ref_loss / median)`` from the task-A model (default
``normalize="none"``). Retention = task-A test accuracy after fine-tuning.

Measured (task-A acc plain -> FLOW, task-B acc plain -> FLOW), seeds 0-7:
0: 0.189 -> 0.276, 0.928 -> 0.938; 1: 0.131 -> 0.370, 0.935 -> 0.935; 2: 0.146 -> 0.342, 0.926 -> 0.940;
3: 0.114 -> 0.323, 0.925 -> 0.918; 4: 0.162 -> 0.308, 0.965 -> 0.946; 5: 0.162 -> 0.290, 0.894 -> 0.925;
6: 0.166 -> 0.293, 0.871 -> 0.960; 7: 0.157 -> 0.300, 0.951 -> 0.926.
Per-seed retention gain +0.087 to +0.239 (mean +0.159); single-seed noise between two plain runs is up to 0.08, so
the test averages seeds 0-2 (gain +0.174) and asserts a mean gain >= 0.08 and a gain on every seed.

Negative control (measured by patching ``FLOWWeighting`` to all-ones weights, i.e. a FLOW no-op through the same
loader): task-A 0.241 / 0.121 / 0.211 on seeds 0-2, a mean gain of +0.036 with seed 1 below plain, so the test fails.

Caveat (measured the same way, not asserted): on this SGD setup a constant weight equal to FLOW's mean weight, or
FLOW's weights shuffled across samples, retain about as much (8-seed means 0.297 and 0.296 vs FLOW 0.313): the gain
shown here is mostly the smaller effective step of unnormalised weights, not the choice of easy samples, and
``normalize="mean1"`` retains no more than plain fine-tuning (0.189 / 0.173 / 0.174 on seeds 0-2).
"""

from __future__ import annotations

import statistics

import pytest

from lightning_ft.demos.rehearsal import RehearsalDemoConfig, _data, finetune, pretrain

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)


def test_flow_weighting_retains_more_of_task_a():
    rows = []
    for seed in SEEDS:
        config = RehearsalDemoConfig(seed=seed, kinds=("no_rehearsal", "flow"))
        data = _data(config)
        state = pretrain(config, data)
        plain, flow = (finetune(config, data, state, kind) for kind in ("no_rehearsal", "flow"))
        assert flow["tau"] > 0, flow
        rows.append((plain, flow))
    summary = [(p["task_a"], f["task_a"], p["task_b"], f["task_b"]) for p, f in rows]
    gains = [f["task_a"] - p["task_a"] for p, f in rows]
    assert all(p["task_a"] <= 0.3 for p, _ in rows), f"negative control: plain fine-tuning should forget ({summary})"
    assert all(g > 0 for g in gains), summary
    assert statistics.fmean(gains) >= 0.08, summary
    for plain, flow in rows:  # task B is still learned, at most a few points below plain fine-tuning
        assert flow["task_b"] >= 0.85 and flow["task_b"] >= plain["task_b"] - 0.05, summary
