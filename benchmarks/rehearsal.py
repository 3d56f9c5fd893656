"""Benchmark of the rehearsal family on digits: retention vs task accuracy per strategy, paired over seeds.

Writes ``benchmarks/results/rehearsal.json`` and ``.md`` (the method card's table).

(a) effect: an MLP learns task A (digits, 8x8), then fine-tunes 15 epochs on task B (inverted digits, labels + 3)
    with no rehearsal, FLOW, or rehearsal of task-A training samples (random, random prior-correct, loss priority,
    mix-cd, FLOW + mix-cd) at 2 and 4 pool samples per batch of 32 fine-tuning samples (6% and 11% of each batch).
    The same seeds for every strategy (the same task-A model and fine-tuning order); the paired difference of
    retained task-A accuracy to random rehearsal at the same budget with a 95% t-interval;
(b) step time of mix-cd sampling + feedback against the same fit with random draws and no feedback (1 thread,
    interleaved rounds).

Usage: python benchmarks/rehearsal.py [--seeds 8] [--skip-timing]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import StepTimer, paired_ci, write_into_card

from lightning_ft.demos.rehearsal import RehearsalDemoConfig, _data, _trainer, finetune, pretrain
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import RehearsalDataModule, RehearsalFeedback

RESULTS = Path(__file__).resolve().parent / "results"
CARD = Path(__file__).resolve().parents[1] / "lightning_ft" / "rehearsal" / "README.md"
REHEARSAL = ("random", "random_prior_correct", "loss_priority", "mixcd", "flow_mixcd")
BUDGETS = (2, 4)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def bench_effect(seeds: int) -> dict:
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        config = RehearsalDemoConfig(seed=seed)
        data = _data(config)
        state = pretrain(config, data)
        for kind in ("no_rehearsal", "flow"):
            runs.append({**finetune(config, data, state, kind), "budget": 0})
        for budget in BUDGETS:
            for kind in REHEARSAL:
                row = finetune(replace(config, replay_per_step=budget), data, state, kind)
                runs.append({**row, "budget": budget})
        print(f"seed {seed}: " + ", ".join(f"{r['kind']}@{r['budget']} {r['task_a']:.3f}" for r in runs[-12:]))
    return {"runs": runs, "summary": summarise(runs)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault((r["kind"], r["budget"]), {})[r["seed"]] = r
    out = []
    for (kind, budget), rows in by_key.items():
        seeds = sorted(rows)
        entry: dict[str, Any] = {"kind": kind, "budget": budget, "n": len(seeds)}
        for metric in ("task_a", "task_b"):
            values = [rows[s][metric] for s in seeds]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        hits = [rows[s]["cd_hit_rate"] for s in seeds if "cd_hit_rate" in rows[s]]
        entry["cd_hit_rate"] = statistics.fmean(hits) if hits else None
        reference = by_key.get(("random", budget)) if budget else None
        if reference and kind != "random":
            entry["task_a_vs_random"] = paired_ci([rows[s]["task_a"] - reference[s]["task_a"] for s in seeds])
            entry["task_b_vs_random"] = paired_ci([rows[s]["task_b"] - reference[s]["task_b"] for s in seeds])
        out.append(entry)
    return out


def bench_step_time(rounds: int, epochs: int = 4) -> dict:
    """Median step time: mix-cd + RehearsalFeedback vs random draws without feedback, same model and budget."""
    config = RehearsalDemoConfig(replay_per_step=4)
    data = _data(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_round = []
    try:
        for _ in range(rounds):
            medians = {}
            for name, strategy, callbacks in (("plain", "random", []), ("mixcd", "mixcd", [RehearsalFeedback()])):
                inner = pl.LightningDataModule.from_datasets(train_dataset=data["task_b"], batch_size=32)
                mixed = RehearsalDataModule(inner, data["task_a"], strategy=strategy, replay_per_step=4)
                timer = StepTimer()
                module = ImageClassifier(arch="mlp", lr=config.lr)
                _trainer(epochs, [*callbacks, timer]).fit(module, mixed)
                steps = len(timer.times) // epochs
                medians[name] = statistics.median(timer.times[steps:])  # the first epoch warms up
            per_round.append(medians)
    finally:
        torch.set_num_threads(threads)
    ratios = [r["mixcd"] / r["plain"] for r in per_round]
    return {
        "per_round": per_round,
        "median_step_seconds": {k: statistics.median(r[k] for r in per_round) for k in ("plain", "mixcd")},
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def _ci(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return ""
    mean, low, high = value
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(results: dict) -> str:
    summary = results["effect"]["summary"]
    n = summary[0]["n"]
    lines = [
        f"**Effect** (mean ± std over {n} paired seeds; the last two columns: paired difference to random rehearsal at"
        " the same budget, mean and 95% interval)\n",
        "| run | pool samples per batch of 32 | task-A acc (retention) | task-B acc | rehearsed samples forgotten"
        " | retention vs random | task B vs random |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in sorted(summary, key=lambda e: (e["budget"], e["kind"] != "random")):
        hit = "" if e["cd_hit_rate"] is None else f"{e['cd_hit_rate']:.3f}"
        lines.append(
            f"| {e['kind']} | {e['budget']} | {e['task_a']:.3f} ± {e['task_a_std']:.3f}"
            f" | {e['task_b']:.3f} ± {e['task_b_std']:.3f} | {hit} | {_ci(e.get('task_a_vs_random'))}"
            f" | {_ci(e.get('task_b_vs_random'))} |"
        )
    timing = results.get("timing")
    if timing:
        lo, hi = timing["ratio_range"]
        m = timing["median_step_seconds"]
        lines.append(
            f"\n**Step time**: mix-cd sampling + `RehearsalFeedback` {1e3 * m['mixcd']:.2f} ms vs random draws without"
            f" feedback {1e3 * m['plain']:.2f} ms per step: {timing['ratio']:.2f}x [{lo:.2f}, {hi:.2f}] (median"
            f" [range] of per-round ratios, {len(timing['per_round'])} interleaved rounds, 1 thread)."
        )
    lines.append(f"\nMachine: {results['machine']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--skip-timing", action="store_true", help="keep the timing of the last results file")
    args = parser.parse_args()
    _quiet()
    torch.set_num_threads(1)
    out = RESULTS / "rehearsal.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    results: dict[str, Any] = {"machine": machine, "config": RehearsalDemoConfig().__dict__ | {"kinds": None}}
    results["effect"] = bench_effect(args.seeds)
    results["timing"] = previous.get("timing") if args.skip_timing else bench_step_time(rounds=5)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (RESULTS / "rehearsal.md").write_text(table + "\n")
    write_into_card(CARD, table)
    print(table)


if __name__ == "__main__":
    main()
