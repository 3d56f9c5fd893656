"""Effect test on a real small run: TSBD removes a BadNets backdoor that vanilla fine-tuning keeps.

Digits upsampled to 16x16, BadNets 3x3 bottom-right patch, 10% all-to-one poisoning (target 0), a BN-CNN trained 30
epochs; the defender fine-tunes on 62 clean training images (5%) with SGD 0.01 for 20-21 epochs. The pipeline is the
demo's (``lightning_ft.demos.backdoor``), so the demo and the benchmark are tested by the same run.
"""

from __future__ import annotations

import pytest

from lightning_ft.demos.backdoor import BackdoorDemoConfig, defend, evaluate_state, prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backdoored():
    config = BackdoorDemoConfig(attack="badnets", arch="bn_cnn", seed=0, neuron_ratio=0.3, rnp_threshold=0.2)
    setup = prepare(config)
    return config, setup, evaluate_state(config, setup)


def test_the_attack_plants_a_backdoor(backdoored):
    _, _, before = backdoored
    assert before["asr"] >= 0.9 and before["acc"] >= 0.85, before


def test_vanilla_finetuning_keeps_the_backdoor(backdoored):
    config, setup, _ = backdoored
    row = defend(config, setup, "vanilla_ft")
    assert row["asr"] >= 0.9, f"negative control: vanilla fine-tuning should keep the backdoor ({row})"
    assert row["acc"] >= 0.85, row


def test_tsbd_removes_the_backdoor(backdoored):
    config, setup, _ = backdoored
    row = defend(config, setup, "tsbd_penalty")
    # most of the backdoor goes (vanilla fine-tuning keeps ASR >= 0.9): the benchmark's sweep measures ASR 0.147 on this
    # seed at n = 0.3 (0.03-0.06 on others), so the bound leaves room for the shuffle order and thread count
    assert row["asr"] <= 0.3, row
    assert row["acc"] >= 0.85, row
    assert row["stage1"]["zeroed_weights"] > 0 and row["stage1"]["stop_rule"] == "accuracy", row


def test_tsbd_clip_mode_removes_most_of_the_backdoor(backdoored):
    # the one-pass variant is weaker than the penalty (see the method card): assert a clear, not a full, removal
    config, setup, _ = backdoored
    row = defend(config, setup, "tsbd_clip")
    assert row["asr"] <= 0.5, row
    assert row["acc"] >= 0.85, row


def test_stage_one_alone_breaks_clean_accuracy_and_stage_two_repairs_it(backdoored):
    config, setup, _ = backdoored
    stage1 = defend(config, setup, "stage1_only")
    assert stage1["acc"] <= 0.6, f"zeroing the selected weights should cost clean accuracy before stage 2 ({stage1})"


def test_rnp_removes_the_badnets_backdoor_on_the_bn_cnn(backdoored):
    # RNP (lightning_ft.backdoor) at the official example's threshold (0.2): without fine-tuning it removes the
    # backdoor but breaks this small network; with the vanilla fine-tuning afterwards (pruned channels held at 0) clean
    # accuracy comes back and the backdoor stays out (at 0.2, 3 seeds: ASR 0.000 / acc 0.38 without, ASR 0.039 / acc
    # 0.969 with fine-tuning)
    config, setup, _ = backdoored
    pruned = defend(config, setup, "rnp")
    assert pruned["rnp"]["pruned_channels"] > 0, pruned
    assert pruned["asr"] <= 0.3, pruned
    finetuned = defend(config, setup, "rnp_ft")
    assert finetuned["asr"] <= 0.3, finetuned
    assert finetuned["acc"] >= 0.85, finetuned


# --- neuron_ratio="auto" on a model and an attack the calibration was not developed on ---------------------------
# Chosen before any run of the calibration on them: the MLP on flattened 8x8 digits (the calibration was developed on
# the BN-CNN with BadNets), the Blended attack, seed 1; TSBD at its defaults, the paper's fine-tuning recipe.


@pytest.fixture(scope="module")
def unseen():
    config = BackdoorDemoConfig(attack="blended", arch="mlp", seed=1, image_size=8, badnets_size=2)
    setup = prepare(config)
    before = evaluate_state(config, setup)
    return before, defend(config, setup, "vanilla_ft"), defend(config, setup, "tsbd_penalty")


def test_auto_calibration_keeps_its_accuracy_budget_on_an_unseen_model(unseen):
    before, vanilla, row = unseen
    assert before["asr"] >= 0.9 and vanilla["asr"] >= 0.9, (before, vanilla)
    stage1 = row["stage1"]
    # the calibration chose a ratio above its smallest candidate (it spent the budget), and the defended model keeps
    # clean accuracy within the default budget (5 points) plus 3 for the gap between the probes' held-out clean images
    # and the test set and for run-to-run noise (measured: 4.7 points)
    assert stage1["neuron_ratio"] > stage1["calibration"][0]["ratio"], stage1
    assert before["acc"] - row["acc"] <= 0.08, (before, row)


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 target not reached: at the ratio the 5-point budget allows (0.2), the Blended backdoor on the MLP"
    " survives TSBD (ASR 0.93); see the method card's Targets table",
)
def test_auto_calibration_removes_the_backdoor_on_an_unseen_model(unseen):
    _, _, row = unseen
    assert row["asr"] <= 0.10, row
