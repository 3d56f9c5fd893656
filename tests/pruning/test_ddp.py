"""``LearnedMaskPruning`` under 2-process CPU DDP: masks and scores agree across ranks at every step."""

from __future__ import annotations

import math

import pytest

from tests.helpers.ddp import run_ddp_script


@pytest.mark.ddp
@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_ddp_masks_and_scores_agree_across_ranks_at_every_step(gate_type, tmp_path):
    r0, r1 = run_ddp_script("ddp_pruning.py", tmp_path, "--gate-type", gate_type)
    assert r0["world_size"] == r1["world_size"] == 2
    # shuffled data: the two ranks trained on different shards (so their local gradients differ)
    assert r0["batch_fingerprints"] != r1["batch_fingerprints"]
    for r in (r0, r1):
        assert r["global_step"] == r["total"] == 6  # 127 digits over 2 ranks, batch 32, 3 epochs
        assert r["steps"] == list(range(6))
        assert r["mask_diffs"] == [0.0] * 6 and r["score_diffs"] == [0.0] * 6
        assert r["param_diff"] == 0.0
        assert r["frozen"]
    assert r0["masks"] == r1["masks"] and r0["scores"] == r1["scores"] and r0["targets"] == r1["targets"]

    # the check is not vacuous: the scores moved, and the masks pruned more and more during the schedule
    assert r0["scores"][-1] != r0["initial_scores"]
    assert all(math.isfinite(s) for s in r0["scores"][-1])
    pruned = [0 if m is None else m.count(0) for m in r0["masks"]]
    assert pruned[0] == 0 and pruned == sorted(pruned) and pruned[-1] == 2 + 4 + 8
    assert len({tuple(m) for m in r0["masks"] if m is not None}) >= 2  # the mask changed at least once
