"""Benchmark of the rehearsal family on digits and text: retention vs task performance per strategy, paired over seeds.

Writes ``benchmarks/results/rehearsal.json`` and ``.md`` (the method card's table).

(a) effect: an MLP learns task A (digits, 8x8), then fine-tunes 15 epochs on task B (inverted digits, labels + 3)
    with no rehearsal, FLOW, or rehearsal of task-A training samples (random, random prior-correct, loss priority,
    mix-cd, FLOW + mix-cd) at 2 and 4 pool samples per batch of 32 fine-tuning samples (6% and 11% of each batch).
    The same seeds for every strategy (the same task-A model and fine-tuning order); the paired difference of
    retained task-A accuracy to random rehearsal at the same budget with a 95% t-interval;
(b) step time of mix-cd sampling + feedback against the same fit with random draws and no feedback (1 thread,
    interleaved rounds);
(c) the text case: a tiny GPT-2 pre-trained on one half of the pydoc topics (task A; its training chunks are the
    pool), fine-tuned on a sample of the other half (task B) with no rehearsal, random rehearsal, mix-cd, FLOW or
    FLOW + mix-cd at the same budget (4 pool chunks per batch of 32), over paired seeds (one pre-trained model; the
    seed draws the task-B sample, the order and the rehearsal draws). Retention is the task-A validation loss after
    fine-tuning (lower is better), next to the task-B validation loss
    (:mod:`lightning_ft.demos.rehearsal_text`).

Usage: python benchmarks/rehearsal.py [--seeds 8] [--skip-timing] [--text-seeds 6]
       [--text-only | --skip-text | --timing-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import IterationTimer, paired_ci, put_mean_std, quiet, write_into_card
from torch.utils.data import ConcatDataset, DataLoader

from lightning_ft.demos.rehearsal import RehearsalDemoConfig, _data, _trainer, finetune, pretrain
from lightning_ft.demos.rehearsal_text import (
    RehearsalTextConfig,
    _task_b,
    base_losses,
    base_module,
    finetune_text,
    pretrain_text,
)
from lightning_ft.demos.rehearsal_text import _trainer as _text_trainer
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import (
    CollateralDamageSampler,
    RehearsalDataModule,
    RehearsalFeedback,
    WithSampleIds,
    batch_sample_ids,
)

RESULTS = Path(__file__).resolve().parent / "results"
CARD = Path(__file__).resolve().parents[1] / "lightning_ft" / "rehearsal" / "README.md"
REHEARSAL = ("random", "random_prior_correct", "loss_priority", "mixcd", "flow_mixcd")
BUDGETS = (2, 4)


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
            put_mean_std(entry, metric, [rows[s][metric] for s in seeds])
        hits = [rows[s]["cd_hit_rate"] for s in seeds if "cd_hit_rate" in rows[s]]
        entry["cd_hit_rate"] = statistics.fmean(hits) if hits else None
        reference = by_key.get(("random", budget)) if budget else None
        if reference and kind != "random":
            entry["task_a_vs_random"] = paired_ci([rows[s]["task_a"] - reference[s]["task_a"] for s in seeds])
            entry["task_b_vs_random"] = paired_ci([rows[s]["task_b"] - reference[s]["task_b"] for s in seeds])
        out.append(entry)
    return out


def bench_text(seeds: int) -> dict:
    """The text case: every kind of :class:`RehearsalTextConfig` on ``seeds`` paired seeds, one pre-trained model."""
    start = time.perf_counter()
    config = RehearsalTextConfig()
    base = pretrain_text(config)
    print(f"text: pre-trained in {base.seconds:.0f} s, correct threshold {base.correct_threshold:.3f}", flush=True)
    runs: list[dict[str, Any]] = []
    before: list[dict[str, Any]] = []
    for seed in range(seeds):
        seeded = replace(config, seed=seed)
        before.append({"seed": seed, **base_losses(seeded, base)})
        for kind in config.kinds:
            runs.append(finetune_text(seeded, base, kind))
        latest = runs[-len(config.kinds) :]
        row = ", ".join(f"{r['kind']} {r['task_a_loss']:.3f}/{r['task_b_loss']:.3f}" for r in latest)
        print(f"text seed {seed} (task-A / task-B loss): {row}", flush=True)
    return {
        "config": asdict(config) | {"kinds": list(config.kinds)},
        "pool_size": len(base.pool),
        "correct_threshold": base.correct_threshold,
        "prior_correct_share": float(base.pool_statistics.correct.float().mean()),
        "pretrain_seconds": base.seconds,
        "seconds": time.perf_counter() - start,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "before": before,
        "runs": runs,
        "summary": summarise_text(runs),
    }


def summarise_text(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_kind.setdefault(r["kind"], {})[r["seed"]] = r
    plain, random = by_kind.get("no_rehearsal"), by_kind.get("random")
    out = []
    for kind, rows in by_kind.items():
        seeds = sorted(rows)
        entry: dict[str, Any] = {"kind": kind, "n": len(seeds)}
        for metric in ("task_a_loss", "task_b_loss"):
            put_mean_std(entry, metric, [rows[s][metric] for s in seeds])
        hits = [rows[s]["cd_hit_rate"] for s in seeds if "cd_hit_rate" in rows[s]]
        entry["cd_hit_rate"] = statistics.fmean(hits) if hits else None
        for name, reference in (("plain", plain), ("random", random)):
            if reference is None or rows is reference or (name == "random" and "cd_hit_rate" not in rows[seeds[0]]):
                continue
            for metric in ("task_a_loss", "task_b_loss"):
                entry[f"{metric}_vs_{name}"] = paired_ci([rows[s][metric] - reference[s][metric] for s in seeds])
            ratios = [100 * (rows[s]["task_b_loss"] / reference[s]["task_b_loss"] - 1) for s in seeds]
            entry[f"task_b_loss_pct_vs_{name}"] = paired_ci(ratios)
        out.append(entry)
    return out


class _RecordBatches(pl.Callback):
    """The concatenated-dataset indices of every training batch, by epoch."""

    def __init__(self) -> None:
        self.epochs: list[list[list[int]]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.epochs[-1].append(batch_sample_ids(batch).tolist())


class _FixedBatches:
    """A plain batch sampler replaying recorded batches, one epoch's list per ``iter``."""

    def __init__(self, epochs: list[list[list[int]]]) -> None:
        self.epochs, self._epoch = epochs, 0

    def __len__(self) -> int:
        return len(self.epochs[0])

    def __iter__(self) -> Iterator[list[int]]:
        self._epoch += 1
        return iter(self.epochs[(self._epoch - 1) % len(self.epochs)])


class _TimedFeedback(RehearsalFeedback):
    """RehearsalFeedback that records the wall time of its per-batch hook."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:  # type: ignore[override]
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.times.append(time.perf_counter() - start)


@contextlib.contextmanager
def _timed_sampler(times: list[float]) -> Iterator[None]:
    """Records the wall time of every batch the CollateralDamageSampler yields (its draw and bookkeeping)."""
    original = CollateralDamageSampler.__iter__

    def timed(self: CollateralDamageSampler) -> Iterator[list[int]]:
        batches = original(self)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            times.append(time.perf_counter() - start)
            if batch is None:
                return
            yield batch

    CollateralDamageSampler.__iter__ = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        CollateralDamageSampler.__iter__ = original  # type: ignore[method-assign]


TIMING_ARCHS = {
    "mlp": "the demo's MLP",
    "bn_cnn": "a BN-CNN (3 conv layers, width 16)",
    "text": "the text case's GPT-2 (2 layers, width 64, 64 tokens)",
}


def bench_step_time(rounds: int, epochs: int = 6) -> dict:
    """:func:`bench_arch_step_time` for the demo's MLP (a 3 ms step: the worst case), a small CNN and the text case."""
    return {arch: bench_arch_step_time(rounds, arch, epochs) for arch in TIMING_ARCHS}


def _timing_case(arch: str) -> dict[str, Any]:
    """What a timed fit needs: the fine-tuning data module, the pool, a module factory, the trainer and the task."""
    if arch == "text":
        config = RehearsalTextConfig()
        base = pretrain_text(config)
        inner = _task_b(config)
        assert inner.train_dataset is not None

        return {
            "inner": inner,
            "finetune": inner.train_dataset,
            "pool": base.pool,
            "statistics": base.pool_statistics,
            "module": lambda: base_module(config, base),
            "trainer": _text_trainer,
            "task": "causal_lm",
        }
    config = RehearsalDemoConfig(replay_per_step=4)
    data = _data(config)
    return {
        "inner": pl.LightningDataModule.from_datasets(train_dataset=data["task_b"], batch_size=32),
        "finetune": data["task_b"],
        "pool": data["task_a"],
        "statistics": None,
        "module": lambda: ImageClassifier(arch=arch, lr=config.lr),
        "trainer": _trainer,
        "task": "classification",
    }


def bench_arch_step_time(rounds: int, arch: str, epochs: int) -> dict:
    """Median loop iteration (fetch + step + hooks): mix-cd sampling + RehearsalFeedback vs the batches of a mix-cd fit
    replayed by a plain batch sampler without feedback, same model; the order of the two alternates over rounds."""
    case = _timing_case(arch)
    n = len(case["finetune"])
    dataset = ConcatDataset([WithSampleIds(case["finetune"]), WithSampleIds(case["pool"], offset=n)])
    pool_statistics = case["statistics"]
    sampler_times: list[float] = []
    feedback_times: list[float] = []

    def mixcd(callbacks: list[pl.Callback]) -> None:
        nonlocal pool_statistics
        mixed = RehearsalDataModule(
            case["inner"], case["pool"], replay_per_step=4, pool_statistics=pool_statistics, task=case["task"]
        )
        feedback = _TimedFeedback()
        with _timed_sampler(sampler_times):
            case["trainer"](epochs, [feedback, *callbacks]).fit(case["module"](), mixed)
        feedback_times.extend(feedback.times)
        pool_statistics = mixed.pool_statistics  # one statistics pass

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_round = []
    try:
        record = _RecordBatches()
        mixcd([record])  # warm-up; its batches are the plain variant's
        for k in range(rounds):
            medians = {}
            for name in ("mixcd", "plain") if k % 2 == 0 else ("plain", "mixcd"):
                timer = IterationTimer()
                if name == "mixcd":
                    mixcd([timer])
                else:
                    plain = DataLoader(dataset, batch_sampler=_FixedBatches(record.epochs))  # type: ignore[arg-type]
                    case["trainer"](epochs, [timer]).fit(case["module"](), plain)
                steps = len(timer.times) // epochs
                medians[name] = statistics.median(timer.times[steps:])  # the first epoch warms up
            per_round.append(medians)
    finally:
        torch.set_num_threads(threads)
    ratios = [r["mixcd"] / r["plain"] for r in per_round]
    median_step = {k: statistics.median(r[k] for r in per_round) for k in ("plain", "mixcd")}
    # the same overhead attributed inside the mix-cd runs: robust to the machine's drift between runs
    ours = statistics.median(sampler_times) + statistics.median(feedback_times)
    return {
        "per_round": per_round,
        "median_step_seconds": median_step,
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "median_sampler_seconds": statistics.median(sampler_times),
        "median_feedback_seconds": statistics.median(feedback_times),
        "attributed_ratio": median_step["mixcd"] / (median_step["mixcd"] - ours),
    }


def _ci(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return ""
    mean, low, high = value
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown_text(text: dict) -> str:
    """The text case's table and notes."""
    c, summary = text["config"], text["summary"]
    n = summary[0]["n"]
    a0 = statistics.fmean(b["task_a_loss"] for b in text["before"])
    b0 = statistics.fmean(b["task_b_loss"] for b in text["before"])
    lines = [
        f"**Text case** (a GPT-2 with {c['n_layer']} layers of width {c['n_embd']} pre-trained {c['pretrain_epochs']}"
        f' epochs on the "pretrain" pydoc topics: task A, its {text["pool_size"]:,} training chunks of {c["seq_len"]}'
        f" tokens are the pool; then fine-tuned {c['finetune_epochs']} epochs, AdamW lr {c['lr']:g}, on {c['n_train']}"
        f' chunks of the "finetune" topics: task B. Validation loss (mean next-token NLL, lower is better) on'
        f" {c['n_val']} held-out chunks of each domain; mean ± std over {n} paired seeds sharing one pre-trained model;"
        " the last four columns: paired differences of the loss, mean and 95% interval)\n",
        f"| run | pool chunks per batch of {c['batch_size']} | task-A loss (retention) | task-B loss"
        " | rehearsed chunks forgotten | task-A loss vs plain | task-B loss vs plain | task-A loss vs random"
        " | task-B loss vs random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| pre-trained model | | {a0:.3f} | {b0:.3f} | | | | | |",
    ]
    for e in summary:
        budget = c["replay_per_step"] if e["cd_hit_rate"] is not None else 0
        hit = "" if e["cd_hit_rate"] is None else f"{e['cd_hit_rate']:.3f}"
        lines.append(
            f"| {e['kind']} | {budget} | {e['task_a_loss']:.3f} ± {e['task_a_loss_std']:.3f}"
            f" | {e['task_b_loss']:.3f} ± {e['task_b_loss_std']:.3f} | {hit}"
            f" | {_ci(e.get('task_a_loss_vs_plain'))} | {_ci(e.get('task_b_loss_vs_plain'))}"
            f" | {_ci(e.get('task_a_loss_vs_random'))} | {_ci(e.get('task_b_loss_vs_random'))} |"
        )
    by_kind = {e["kind"]: e for e in summary}
    notes = [
        f"\nA chunk counts as correct when its greedy next-token accuracy is at least {text['correct_threshold']:.3f}"
        " (the pre-trained model's median over the pool, so"
        f" {text['prior_correct_share']:.0%} of the pool is prior-correct; the library's default 0.5 is reached by"
        ' almost no chunk of a model this small); "forgotten": prior-correct and below it in the training pass.'
    ]
    flow = by_kind.get("flow")
    if flow and "task_b_loss_pct_vs_plain" in flow:
        # the target, read for a language model: less forgetting (task-A loss interval below 0) at a task-B
        # loss at most 1% above plain fine-tuning's (upper end of the interval of the relative change)
        a_mean, a_low, a_high = flow["task_a_loss_vs_plain"]
        mean, low, high = flow["task_b_loss_pct_vs_plain"]
        reduced, within = a_high < 0, high <= 1.0
        notes.append(
            f"FLOW vs plain fine-tuning: task-A loss {a_mean:+.3f} [{a_low:+.3f}, {a_high:+.3f}]"
            f" ({'less forgetting' if reduced else 'less forgetting not shown'}), task-B loss {mean:+.2f}%"
            f" [{low:+.2f}%, {high:+.2f}%] ({'within' if within else 'not within'} 1%): target (less forgetting at"
            f" <= 1% task-B loss) {'met' if reduced and within else 'not met'}."
        )
    fine_tuning = text["seconds"] - text["pretrain_seconds"]
    notes.append(
        f"Runtime: pre-training and pool statistics {text['pretrain_seconds']:.0f} s, {len(text['runs'])} fine-tuning"
        f" runs {fine_tuning:.0f} s (1 thread; {text['machine']})."
    )
    return "\n".join(lines) + "\n" + " ".join(notes[:1]) + "\n\n" + "\n\n".join(notes[1:])


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
    timing = results.get("timing") or {}
    if timing:
        lines.append(
            "\n**Step time** (a loop iteration: batch fetch, step and hooks; mix-cd sampling + `RehearsalFeedback` vs"
            " the same batches from a plain batch sampler without feedback, interleaved rounds, 1 thread; the last"
            " column times the sampler and the feedback hook inside the mix-cd runs, which the machine's drift between"
            " runs does not disturb)\n"
        )
        lines.append(
            "| model | plain | mix-cd | ratio, median [range] over rounds | sampler + feedback per batch |"
            " attributed ratio |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        for arch, t in timing.items():
            lo, hi = t["ratio_range"]
            m = t["median_step_seconds"]
            lines.append(
                f"| {TIMING_ARCHS.get(arch, arch)} | {1e3 * m['plain']:.2f} ms | {1e3 * m['mixcd']:.2f} ms |"
                f" {t['ratio']:.2f}x [{lo:.2f}, {hi:.2f}] ({len(t['per_round'])} rounds) |"
                f" {1e6 * t['median_sampler_seconds']:.0f} + {1e6 * t['median_feedback_seconds']:.0f} us |"
                f" {t['attributed_ratio']:.3f}x |"
            )
    lines.append(f"\nMachine: {results['machine']}.")
    if results.get("text"):
        lines.append("\n" + markdown_text(results["text"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--skip-timing", action="store_true", help="keep the timing of the last results file")
    parser.add_argument("--text-seeds", type=int, default=6)
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--text-only", action="store_true", help="run the text case only; keep the digits results and timing"
    )
    only.add_argument("--skip-text", action="store_true", help="keep the text case of the last results file")
    only.add_argument("--timing-only", action="store_true", help="rerun the step timing only; keep everything else")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    out = RESULTS / "rehearsal.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    if args.text_only or args.timing_only:
        if "effect" not in previous:
            raise SystemExit(f"this option keeps the digits results of {out}, which has none: run without it first.")
        results: dict[str, Any] = dict(previous)
        if args.timing_only:
            results["timing"] = bench_step_time(rounds=7)
    else:
        results = {"machine": machine, "config": RehearsalDemoConfig().__dict__ | {"kinds": None}}
        results["effect"] = bench_effect(args.seeds)
        results["timing"] = previous.get("timing") if args.skip_timing else bench_step_time(rounds=7)
    skip_text = args.skip_text or args.timing_only
    results["text"] = previous.get("text") if skip_text else bench_text(args.text_seeds)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (RESULTS / "rehearsal.md").write_text(table + "\n")
    write_into_card(CARD, table)
    print(table)


if __name__ == "__main__":
    main()
