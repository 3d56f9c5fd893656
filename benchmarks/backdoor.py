"""Benchmark of the backdoor family: TSBD's effect over seeds, attacks and models, and its step-time overhead.

Writes ``benchmarks/results/backdoor.json`` and ``benchmarks/results/backdoor.md`` (the method card's results).

(a) effect: digits at 16x16 (8x8 for the MLP), BadNets (3x3 patch; 2x2 at 8x8) and Blended (alpha 0.2, seeded noise
    pattern), 10% all-to-one poisoning; a BN-CNN, timm's ``test_resnet``, a timm ViT (``test_vit``, 4x4 patches) and
    an MLP (a family the calibration was not developed on); 3 seeds; the defender has 5% of the training split (62
    clean images). Rows: no defense / vanilla fine-tuning / stage 1 only / stage 1 + vanilla fine-tuning / TSBD
    penalty / TSBD clip / RNP / RNP + fine-tuning, with C-ACC, ASR, RA and DER (mean +- std over seeds). TSBD runs at
    its defaults (``neuron_ratio="auto"``, calibrated on the clean data); stage 1 only, stage 1 + FT and clip use the
    ratio the penalty run's calibration chose (the calibration does not depend on stage 2). Every defense of a seed
    starts from the same backdoored weights, whose SHA-256 is stored with each row;
(b) a ``neuron_ratio`` sweep (seed 0, every attack and model, TSBD penalty): where the calibration landed against
    what an attacker-aware sweep would pick;
(c) the per-step time of stage 2 (penalty, clip) against the same Lightning fit without callbacks, on the same model
    and batches, interleaved in one process; stage 1's wall time.

Usage: python benchmarks/backdoor.py [--quick] [--skip-timing]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import interleaved_step_times, put_mean_std, quiet, write_results
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.backdoor import ActivenessAwareFineTuning
from lightning_ft.demos.backdoor import KINDS, BackdoorDemoConfig, defend, defend_all, evaluate_state, prepare
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results"
CARD = Path(__file__).resolve().parents[1] / "lightning_ft" / "backdoor" / "README.md"
ARCHS = ("bn_cnn", "test_resnet", "test_vit", "mlp")
ATTACKS = ("badnets", "blended")
# the MLP reads flattened 8x8 digits: the BadNets patch is 2x2 there (as in the method spec's 8x8 run)
# the ViT needs 60 attack epochs to reach a clean accuracy like the CNNs' (0.94 on seed 0; 0.75 after 30)
ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "mlp": {"image_size": 8, "badnets_size": 2},
    "test_vit": {"attack_epochs": 60},
}
# RNP masks BatchNorm channels: not applicable to these BatchNorm-free models
NO_BATCHNORM = ("test_vit", "mlp")
TIMING_ARCHS = ("bn_cnn", "test_resnet")  # the step-time comparison (16x16 batches of 64)
SWEEP = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
METRICS = ("acc", "asr", "ra", "der", "acc_drop")
# the targets for TSBD at its defaults: mean ASR <= 0.10 and a mean clean-accuracy drop <= 5 points
TARGET_ASR, TARGET_DROP = 0.10, 0.05


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's names and tensor bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def bench_effect(
    seeds: list[int],
    archs: tuple[str, ...],
    attacks: tuple[str, ...],
    sweep: list[float],
    kinds: tuple[str, ...] = KINDS,
) -> dict:
    runs: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    for arch in archs:
        for attack in attacks:
            for seed in seeds:
                applicable = [k for k in kinds if not (arch in NO_BATCHNORM and k.startswith("rnp"))]
                if not applicable:
                    continue
                config = BackdoorDemoConfig(attack=attack, arch=arch, seed=seed, **ARCH_CONFIG.get(arch, {}))
                setup = prepare(config)
                digest = weights_hash(setup.backdoored_state)
                before = evaluate_state(config, setup)
                print(f"{arch} {attack} seed {seed}: backdoored acc {before['acc']:.3f} asr {before['asr']:.3f}")
                # stage1_only, stage1_ft and tsbd_clip reuse the ratio the penalty run's calibration chose
                for row in defend_all(config, setup, applicable):
                    row = {**{k: v for k, v in row.items() if k != "nwc"}, "attack_seconds": setup.attack_seconds}
                    row["weights_sha256"] = digest
                    if "stage1" in row:
                        row["neuron_ratio"] = row["stage1"]["neuron_ratio"]
                    runs.append(_with_der(row, before))
                    print(f"  {row['kind']}: acc {row['acc']:.3f} asr {row['asr']:.3f} ra {row['ra']:.3f}", flush=True)
                if seed == seeds[0]:
                    for ratio in sweep:
                        row = defend(replace(config, neuron_ratio=ratio), setup, "tsbd_penalty")
                        row.pop("nwc", None)
                        sweep_rows.append({**_with_der(row, before), "neuron_ratio": ratio, "weights_sha256": digest})
                        print(f"  sweep n={ratio}: acc {row['acc']:.3f} asr {row['asr']:.3f}", flush=True)
    return {"runs": runs, "summary": summarise(runs), "sweep": sweep_rows}


def _with_der(row: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    from lightning_ft.backdoor import defense_effectiveness_rating

    der = defense_effectiveness_rating(before["asr"], row["asr"], before["acc"], row["acc"])
    return {**row, "der": der, "acc_drop": before["acc"] - row["acc"]}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (model, attack, defense)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault((row["arch"], row["attack"], row["kind"]), []).append(row)
    out = []
    order = {name: i for i, name in enumerate((*ARCHS, *ATTACKS, *KINDS))}
    for (arch, attack, kind), rows in sorted(groups.items(), key=lambda kv: [order.get(k, 99) for k in kv[0]]):
        entry: dict[str, Any] = {"arch": arch, "attack": attack, "kind": kind, "n": len(rows)}
        for metric in METRICS:
            put_mean_std(entry, metric, [r[metric] for r in rows])
        stage1 = [r["stage1_seconds"] for r in rows if r.get("stage1_seconds") is not None]
        entry["stage1_seconds"] = statistics.fmean(stage1) if stage1 else None
        entry["seconds"] = statistics.fmean(r["seconds"] for r in rows)
        entry["neuron_ratios"] = [r.get("neuron_ratio") for r in sorted(rows, key=lambda r: r["seed"])]
        out.append(entry)
    return out


def bench_step_time(arch: str, epochs: int, rounds: int) -> dict:
    """Median step time of plain / penalty / clip fits on the same model and batches, interleaved over rounds."""
    x, y = load_digits_tensors(16)
    loader = DataLoader(TensorDataset(x[:1280], y[:1280]), batch_size=64, shuffle=False)
    variants: dict[str, Callable[[], list[pl.Callback]]] = {
        "vanilla": list,
        "penalty": lambda: [ActivenessAwareFineTuning(mode="penalty")],
        "clip": lambda: [ActivenessAwareFineTuning(mode="clip")],
    }
    timing = interleaved_step_times(variants, lambda: ImageClassifier(arch=arch, seed=0), loader, epochs, rounds)
    return {"arch": arch, **timing}


def _pm(entry: dict[str, Any], metric: str) -> str:
    return f"{entry[metric]:.3f} ± {entry[f'{metric}_std']:.3f}"


def markdown(results: dict) -> str:
    lines = []
    effect = results["effect"]
    n = effect["summary"][0]["n"] if effect["summary"] else 0
    lines.append(f"**Effect** (mean ± std over {n} seeds; DER against the backdoored model, 0.5 = no change)\n")
    lines.append("| model | attack | defense | C-ACC | ASR | RA | DER |")
    lines.append("|---|---|---|---:|---:|---:|---:|")
    for e in effect["summary"]:
        lines.append(
            f"| {e['arch']} | {e['attack']} | {e['kind']} | {_pm(e, 'acc')} | {_pm(e, 'asr')} | {_pm(e, 'ra')}"
            f" | {_pm(e, 'der')} |"
        )
    penalty = [e for e in effect["summary"] if e["kind"] == "tsbd_penalty"]
    if penalty:
        lines.append(
            f"\n**Targets** (TSBD at its defaults, penalty mode: mean ASR <= {TARGET_ASR:.2f} and mean clean-accuracy"
            f" drop <= {100 * TARGET_DROP:.0f} points against the backdoored model; the ratio `auto` chose per seed)\n"
        )
        lines.append("| model | attack | ASR | accuracy drop (points) | chosen `neuron_ratio` | met |")
        lines.append("|---|---|---:|---:|---|---|")
        met = 0
        for e in penalty:
            ok = e["asr"] <= TARGET_ASR and e["acc_drop"] <= TARGET_DROP
            met += ok
            ratios = ", ".join(f"{r:g}" for r in e["neuron_ratios"] if r is not None)
            lines.append(
                f"| {e['arch']} | {e['attack']} | {e['asr']:.3f} | {100 * e['acc_drop']:.1f} | {ratios}"
                f" | {'yes' if ok else 'no'} |"
            )
        lines.append(f"\n{met} of {len(penalty)} cells met.")
        calibrations = [r for r in effect["runs"] if r["kind"] == "tsbd_penalty" and r["seed"] == 0]
        if calibrations:
            lines.append(
                "\n**Calibration** (seed 0: the repair probes' held-out clean accuracy per candidate ratio, the"
                " reference is the backdoored model's accuracy on the same clean images; the scan stops at the first"
                " candidate outside the budget)\n"
            )
            lines.append("| model | attack | reference | candidates: ratio -> repaired accuracy | chosen |")
            lines.append("|---|---|---:|---|---:|")
            for r in calibrations:
                stage1 = r["stage1"]
                cells = ", ".join(
                    f"{c['ratio']:g} -> {c['repaired_acc']:.3f}{'' if c['within_budget'] else ' (out)'}"
                    for c in stage1.get("calibration", [])
                )
                lines.append(
                    f"| {r['arch']} | {r['attack']} | {stage1.get('calibration_reference_acc', float('nan')):.3f}"
                    f" | {cells} | {stage1['neuron_ratio']:g} |"
                )
    if effect["sweep"]:
        lines.append("\n**`neuron_ratio` sweep** (seed 0, TSBD penalty; C-ACC / ASR)\n")
        ratios = sorted({r["neuron_ratio"] for r in effect["sweep"]})
        lines.append("| model | attack | " + " | ".join(f"n = {r}" for r in ratios) + " |")
        lines.append("|---|---|" + "---:|" * len(ratios))
        for arch in [a for a in ARCHS if any(r["arch"] == a for r in effect["sweep"])]:
            for attack in ATTACKS:
                cells = []
                for ratio in ratios:
                    match = [
                        r
                        for r in effect["sweep"]
                        if (r["arch"], r["attack"], r["neuron_ratio"]) == (arch, attack, ratio)
                    ]
                    cells.append(f"{match[0]['acc']:.3f} / {match[0]['asr']:.3f}" if match else "")
                if any(cells):
                    lines.append(f"| {arch} | {attack} | " + " | ".join(cells) + " |")
    if results.get("timing"):
        rounds = len(results["timing"][0]["per_round"])
        lines.append(
            "\n**Step time** (median per training step, same model and batches, batch 64 at 16x16, 1 thread; ratio:"
            f" median [range] over {rounds} interleaved rounds)\n"
        )
        lines.append("| model | vanilla (ms) | penalty (ms) | clip (ms) | penalty / vanilla | clip / vanilla |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for t in results["timing"]:
            m = t["median_step_seconds"]
            p_lo, p_hi = t["ratio_penalty_range"]
            c_lo, c_hi = t["ratio_clip_range"]
            lines.append(
                f"| {t['arch']} | {1e3 * m['vanilla']:.1f} | {1e3 * m['penalty']:.1f} | {1e3 * m['clip']:.1f}"
                f" | {t['ratio_penalty']:.2f}x [{p_lo:.2f}, {p_hi:.2f}]"
                f" | {t['ratio_clip']:.2f}x [{c_lo:.2f}, {c_hi:.2f}] |"
            )
    stage1 = [e for e in effect["summary"] if e["kind"] == "tsbd_penalty" and e["stage1_seconds"] is not None]
    if stage1:
        lines.append(
            "\n**Stage 1 wall time** (clean unlearning of a copy, the `auto` calibration's repair probes, selection and"
            " zeroing; 62 images)\n"
        )
        lines.append("| model | attack | seconds |")
        lines.append("|---|---|---:|")
        for e in stage1:
            lines.append(f"| {e['arch']} | {e['attack']} | {e['stage1_seconds']:.2f} |")
    lines.append(f"\nMachine: {results['machine']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, BadNets, BN-CNN; no card update")
    parser.add_argument("--skip-timing", action="store_true", help="keep the timing of the last results file")
    parser.add_argument("--timing-only", action="store_true", help="keep the effect of the last results file")
    parser.add_argument(
        "--kinds", default="", help="comma-separated defenses to rerun, merged into the last results (e.g. rnp,rnp_ft)"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the neuron_ratio sweep")
    parser.add_argument(
        "--part",
        default="",
        help="run only these comma-separated models into backdoor_part_<models>.json (no card update), e.g. to use"
        " one process per core; --merge then combines the parts",
    )
    parser.add_argument("--merge", action="store_true", help="combine the backdoor_part_*.json files")
    args = parser.parse_args()
    quiet()
    # one thread: the backdoored weights (hashed into every row) are the same in a full run, a part and a --kinds rerun
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    archs = ("bn_cnn",) if args.quick else tuple(args.part.split(",")) if args.part else ARCHS
    attacks = ("badnets",) if args.quick else ATTACKS
    sweep = [] if args.quick or args.no_sweep else SWEEP
    if args.merge:
        merge_parts(args.skip_timing)
        return
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results: dict[str, Any] = {"machine": machine, "config": asdict(BackdoorDemoConfig()), "arch_config": ARCH_CONFIG}
    name = "backdoor_quick" if args.quick else f"backdoor_part_{'_'.join(archs)}" if args.part else "backdoor"
    out = RESULTS / f"{name}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.timing_only:
        results["effect"], results["effect_seconds"] = previous["effect"], previous["effect_seconds"]
    elif args.kinds:
        kinds = tuple(args.kinds.split(","))
        start = time.perf_counter()
        new = bench_effect(seeds, archs, attacks, [], kinds=kinds)["runs"]
        old = previous.get("effect", {})
        runs = [r for r in old.get("runs", []) if r["kind"] not in kinds] + new
        results["effect"] = {"runs": runs, "summary": summarise(runs), "sweep": old.get("sweep", [])}
        results["effect_seconds"] = previous.get("effect_seconds", 0.0) + time.perf_counter() - start
    else:
        start = time.perf_counter()
        results["effect"] = bench_effect(seeds, archs, attacks, sweep)
        results["effect_seconds"] = time.perf_counter() - start
    if args.skip_timing:
        results["timing"] = previous.get("timing", [])
    else:
        timed = [a for a in archs if a in TIMING_ARCHS]
        results["timing"] = [bench_step_time(arch, epochs=4, rounds=1 if args.quick else 5) for arch in timed]
    print(write_results(results, out, markdown, None if args.quick or args.part else CARD))


def merge_parts(keep_timing: bool) -> None:
    """Combine ``backdoor_part_*.json`` (written by ``--part``) into ``backdoor.json`` and the card, in model order; a
    model's rows come from the newest part that has it (a part rerun for one model replaces its rows)."""
    files = sorted(RESULTS.glob("backdoor_part_*.json"), key=lambda p: p.stat().st_mtime)
    parts = [json.loads(p.read_text()) for p in files]
    if not parts:
        raise SystemExit("no backdoor_part_*.json: run with --part first")
    out = RESULTS / "backdoor.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    newest = {row["arch"]: i for i, part in enumerate(parts) for row in part["effect"]["runs"]}

    def rows(key: str) -> list[dict[str, Any]]:
        picked = [r for i, part in enumerate(parts) for r in part["effect"][key] if newest[r["arch"]] == i]
        return sorted(picked, key=lambda r: (ARCHS.index(r["arch"]), ATTACKS.index(r["attack"]), r["seed"]))

    runs, sweep = rows("runs"), rows("sweep")
    results = {k: v for k, v in parts[0].items() if k not in ("effect", "effect_seconds", "timing")}
    results["machine"] = f"{parts[0]['machine']}, one process per part ({len(parts)} in parallel)"
    results["effect"] = {"runs": runs, "summary": summarise(runs), "sweep": sweep}
    results["effect_seconds"] = max(part["effect_seconds"] for part in parts)
    results["arch_config"] = ARCH_CONFIG
    results["timing"] = previous.get("timing", []) if keep_timing else [t for p in parts for t in p.get("timing", [])]
    print(write_results(results, out, markdown, CARD))


if __name__ == "__main__":
    main()
