"""Benchmark of the pruning family: learned channel masks vs Lightning's ModelPruning at the same sparsity and epochs.

Writes ``benchmarks/results/pruning.json`` and ``benchmarks/results/pruning.md`` (the method card's results).

(a) vision: digits at 16x16, a BN-CNN (conv 32-64-128) and timm's ``test_resnet``, trained dense with Adam, then 5
    more epochs while pruning 30/50/70% of the removable conv channels: ModelPruning (L1 structured, one shot after
    the first epoch, or gradual over the learned masks' schedule) vs LearnedMaskPruning (sigmoid, HardConcrete);
    test accuracy (mean +- std over seeds), the exported model's parameters and FLOPs;
(b) text: a tiny GPT-2 (2 layers, 512 MLP neurons) pretrained on one half of CPython's pydoc topics, then
    fine-tuned on the other half while pruning its MLP neurons; validation perplexity;
(c) the training-step time while learning masks against the same Lightning fit without callbacks (same model and
    batches, interleaved rounds, 1 thread), and the inference time of exported vs dense models.

Usage: python benchmarks/pruning.py [--quick] [--skip-timing]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import interleaved_step_times, put_mean_std, quiet, write_results
from lightning.pytorch.callbacks import ModelPruning
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft._internal.modules import eval_mode
from lightning_ft.demos._common import cpu_trainer
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.models import CausalLMModule
from lightning_ft.demos.pruning import METHODS, PruningDemoConfig, _gradual_amounts, finetune, pretrain
from lightning_ft.demos.text import PydocTextDataModule
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.pruning import LearnedMaskPruning, export

RESULTS = Path(__file__).resolve().parent / "results"
CARD = Path(__file__).resolve().parents[1] / "lightning_ft" / "pruning" / "README.md"
SPARSITIES = (0.3, 0.5, 0.7)
PRUNING = tuple(m for m in METHODS if m != "dense")
LM = {"vocab_size": 1024, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4, "dropout": 0.0, "lr": 1e-3}


def bench_vision(archs: tuple[str, ...], seeds: list[int], sparsities: tuple[float, ...]) -> list[dict[str, Any]]:
    runs = []
    for arch in archs:
        for seed in seeds:
            config = PruningDemoConfig(arch=arch, seed=seed)
            state = pretrain(config)
            dense = finetune(config, state, "dense")
            runs.append({**dense, "arch": arch, "seed": seed, "sparsity": 0.0})
            print(f"{arch} seed {seed}: dense {dense['acc']:.3f}", flush=True)
            for sparsity in sparsities:
                for method in PRUNING:
                    row = finetune(PruningDemoConfig(arch=arch, seed=seed, sparsity=sparsity), state, method)
                    runs.append({**row, "arch": arch, "seed": seed, "sparsity": sparsity})
                    print(f"  {sparsity:.0%} {method}: acc {row['acc']:.3f}", flush=True)
    return runs


def _lm_data(domain: str, n_train: int | None) -> PydocTextDataModule:
    return PydocTextDataModule(seq_len=64, domain=domain, n_train=n_train, n_val=128, batch_size=16, seed=0)


@torch.no_grad()
def _perplexity(module: torch.nn.Module, data: PydocTextDataModule) -> float:
    with eval_mode(module):
        losses = [float(module(input_ids=b["input_ids"], labels=b["labels"]).loss) for b in data.val_dataloader()]
    return math.exp(statistics.fmean(losses))


def bench_text(seeds: list[int], sparsities: tuple[float, ...], pretrain_epochs: int, epochs: int) -> list[dict]:
    runs = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        base = CausalLMModule(**LM, seed=seed)
        cpu_trainer(pretrain_epochs).fit(base, _lm_data("pretrain", None))
        state = copy.deepcopy(base.state_dict())
        finetune_data = _lm_data("finetune", 512)
        finetune_data.setup("fit")
        print(f"text seed {seed}: pretrained, ppl on the new domain {_perplexity(base.model, finetune_data):.1f}")
        for sparsity in (0.0, *sparsities):
            for method in ("dense",) if sparsity == 0 else PRUNING:
                pl.seed_everything(seed + 1, verbose=False)
                module = CausalLMModule(**LM, seed=seed)
                module.load_state_dict(state)
                c_fc = [m.mlp.c_fc for m in module.model.transformer.h]
                callbacks: list[pl.Callback] = []
                config = PruningDemoConfig(sparsity=sparsity, finetune_epochs=epochs)
                if method.startswith("model_pruning"):
                    amounts = _gradual_amounts(config) if method == "model_pruning_gradual" else None
                    callbacks.append(
                        ModelPruning(
                            "ln_structured",
                            parameters_to_prune=[(layer, "weight") for layer in c_fc],
                            amount=(lambda e, a=amounts: a[e]) if amounts else sparsity,
                            apply_pruning=True if amounts else (lambda e: e == 0),
                            use_global_unstructured=False,
                            pruning_norm=1,
                            pruning_dim=1,  # transformers' Conv1D weight is (in, out): neurons are columns
                            make_pruning_permanent=True,
                            verbose=0,
                        )
                    )
                elif method.startswith("learned"):
                    callbacks.append(
                        LearnedMaskPruning(
                            sparsity=sparsity,
                            gate_type="hard_concrete" if method == "learned_hc" else "sigmoid",
                            layer_types=("hf_conv1d",),
                            include=(r"mlp\.c_fc$",),
                            schedule_start=0.0,
                            schedule_end=config.schedule_end,
                        )
                    )
                start = time.perf_counter()
                cpu_trainer(epochs, callbacks=callbacks).fit(module, finetune_data)
                row: dict[str, Any] = {
                    "arch": "gpt2_tiny",
                    "seed": seed,
                    "sparsity": sparsity,
                    "method": method,
                    "ppl": _perplexity(module.model, finetune_data),
                    "seconds": time.perf_counter() - start,
                }
                if method.startswith("learned"):
                    example = {"input_ids": torch.zeros(1, 64, dtype=torch.long)}
                    small, report = export(module.model, example_input=example)
                    row["export"] = report.to_dict()
                    row["exported_ppl"] = _perplexity(small, finetune_data)
                runs.append(row)
                print(f"  {sparsity:.0%} {method}: ppl {row['ppl']:.2f}", flush=True)
    return runs


def summarise(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault((row["arch"], row["sparsity"], row["method"]), []).append(row)
    out = []
    for (arch, sparsity, method), rows in groups.items():
        entry: dict[str, Any] = {"arch": arch, "sparsity": sparsity, "method": method, "n": len(rows)}
        put_mean_std(entry, metric, [r[metric] for r in rows])
        exports = [r["export"] for r in rows if r.get("export")]
        if exports:
            entry["param_reduction"] = statistics.fmean(e["param_reduction"] for e in exports)
            flops = [e["flop_reduction"] for e in exports if e["flop_reduction"] is not None]
            entry["flop_reduction"] = statistics.fmean(flops) if flops else None
            entry["params_after"] = statistics.fmean(e["params_after"] for e in exports)
            entry["params_before"] = exports[0]["params_before"]
        out.append(entry)
    return out


def bench_step_time(epochs: int, rounds: int) -> dict[str, Any]:
    """Median step time of a plain fit and of fits learning masks, same BN-CNN and batches, interleaved rounds."""
    x, y = load_digits_tensors(16)
    loader = DataLoader(TensorDataset(x[:1280], y[:1280]), batch_size=64, shuffle=False)
    variants: dict[str, Callable[[], list[pl.Callback]]] = {
        "vanilla": list,
        "learned": lambda: [LearnedMaskPruning(sparsity=0.5, make_permanent=False)],
        "learned_hc": lambda: [LearnedMaskPruning(sparsity=0.5, gate_type="hard_concrete", make_permanent=False)],
    }

    def make_module() -> ImageClassifier:
        return ImageClassifier(arch="bn_cnn", width=32, optimizer="adam", lr=1e-3, seed=0)

    return interleaved_step_times(variants, make_module, loader, epochs, rounds)


@torch.no_grad()
def bench_inference(sparsities: tuple[float, ...], reps: int = 30) -> list[dict[str, Any]]:
    """Eval forward time (batch 256, 16x16, 1 thread) of the BN-CNN, dense and exported at each sparsity (masks
    from the scores' top-k on random scores: the time depends only on the channel counts)."""
    from lightning_ft.demos.pruning import EXTRA_CHAINS
    from lightning_ft.demos.vision import SmallBNCNN
    from lightning_ft.pruning import attach_gates, topk_keep_masks

    x = torch.randn(256, 1, 16, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def timed(model: torch.nn.Module) -> float:
        model.eval()
        for _ in range(3):
            model(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    rows = []
    try:
        torch.manual_seed(0)
        dense = SmallBNCNN(width=32)
        dense_seconds = timed(dense)
        for sparsity in sparsities:
            model = copy.deepcopy(dense)
            gated = attach_gates(model)
            masks = topk_keep_masks([torch.randn(g.num_neurons) for g in gated], sparsity)
            for g, m in zip(gated, masks, strict=True):
                g.gate.mask = m
            small, report = export(model, example_input=x[:1], chains=EXTRA_CHAINS["bn_cnn"])
            seconds = timed(small)
            rows.append({"sparsity": sparsity, "dense_ms": 1e3 * dense_seconds, "exported_ms": 1e3 * seconds})
            rows[-1].update(report.to_dict())
    finally:
        torch.set_num_threads(threads)
    return rows


def _pm(entry: dict[str, Any], metric: str, digits: int = 3) -> str:
    return f"{entry[metric]:.{digits}f} ± {entry[f'{metric}_std']:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = []
    vision = results["vision_summary"]
    n = vision[0]["n"] if vision else 0
    lines.append(
        f"**Vision** (digits 16x16; test accuracy, mean ± std over {n} seeds; 5 fine-tuning epochs after 15 dense;"
        " the learned masks' exported model: parameters and FLOPs removed)\n"
    )
    for arch in dict.fromkeys(e["arch"] for e in vision):
        dense = next(e for e in vision if e["arch"] == arch and e["method"] == "dense")
        lines.append(f"`{arch}` (dense fine-tuning: {_pm(dense, 'acc')})\n")
        lines.append(
            "| sparsity | ModelPruning one-shot | ModelPruning gradual | learned (sigmoid) | learned (HardConcrete)"
            " | exported params / FLOPs removed |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for sparsity in sorted({e["sparsity"] for e in vision if e["arch"] == arch and e["sparsity"] > 0}):
            cells = {e["method"]: e for e in vision if e["arch"] == arch and e["sparsity"] == sparsity}
            learned = cells.get("learned", {})
            reduction = (
                f"{learned['param_reduction']:.0%} / {learned['flop_reduction']:.0%}"
                if learned.get("flop_reduction") is not None
                else ""
            )
            row = " | ".join(_pm(cells[m], "acc") if m in cells else "" for m in PRUNING)
            lines.append(f"| {sparsity:.0%} | {row} | {reduction} |")
        lines.append("")
    text = results.get("text_summary") or []
    if text:
        dense = next(e for e in text if e["method"] == "dense")
        n = dense["n"]
        lines.append(
            f"**Text** (tiny GPT-2, 2 layers, 512 MLP neurons; validation perplexity on the new domain, mean ± std"
            f" over {n} seeds; dense fine-tuning: {_pm(dense, 'ppl', 2)})\n"
        )
        lines.append(
            "| MLP sparsity | ModelPruning one-shot | ModelPruning gradual | learned (sigmoid) | learned (HardConcrete)"
            " | exported params removed |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for sparsity in sorted({e["sparsity"] for e in text if e["sparsity"] > 0}):
            cells = {e["method"]: e for e in text if e["sparsity"] == sparsity}
            learned = cells.get("learned", {})
            reduction = f"{learned['param_reduction']:.0%}" if learned else ""
            row = " | ".join(_pm(cells[m], "ppl", 2) if m in cells else "" for m in PRUNING)
            lines.append(f"| {sparsity:.0%} | {row} | {reduction} |")
        lines.append("")
    timing = results.get("timing")
    if timing:
        m = timing["median_step_seconds"]
        rounds = len(timing["per_round"])
        lines.append(
            "**Step time while learning masks** (BN-CNN width 32, batch 64 at 16x16, 1 thread; ratio: median [range]"
            f" over {rounds} interleaved rounds)\n"
        )
        lines.append("| vanilla (ms) | sigmoid (ms) | HardConcrete (ms) | sigmoid / vanilla | HardConcrete / vanilla |")
        lines.append("|---:|---:|---:|---:|---:|")
        lo, hi = timing["ratio_learned_range"]
        hlo, hhi = timing["ratio_learned_hc_range"]
        lines.append(
            f"| {1e3 * m['vanilla']:.1f} | {1e3 * m['learned']:.1f} | {1e3 * m['learned_hc']:.1f}"
            f" | {timing['ratio_learned']:.2f}x [{lo:.2f}, {hi:.2f}] | {timing['ratio_learned_hc']:.2f}x"
            f" [{hlo:.2f}, {hhi:.2f}] |\n"
        )
    inference = results.get("inference")
    if inference:
        lines.append("**Exported BN-CNN** (eval forward of 256 images at 16x16, 1 thread, median of 30)\n")
        lines.append("| channel sparsity | parameters | FLOPs | forward (ms) | speed-up |")
        lines.append("|---:|---:|---:|---:|---:|")
        first = inference[0]
        lines.append(
            f"| 0% | {first['params_before']:,} | {first['flops_before']:,} | {first['dense_ms']:.1f} | 1.00x |"
        )
        for r in inference:
            lines.append(
                f"| {r['sparsity']:.0%} | {r['params_after']:,} | {r['flops_after']:,} | {r['exported_ms']:.1f}"
                f" | {r['dense_ms'] / r['exported_ms']:.2f}x |"
            )
        lines.append("")
    lines.append(f"Machine: {results['machine']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, BN-CNN, 50%; no card update")
    parser.add_argument("--skip-timing", action="store_true", help="keep the timing of the last results file")
    parser.add_argument("--skip-text", action="store_true", help="keep the text case of the last results file")
    parser.add_argument("--timing-only", action="store_true", help="keep the effect of the last results file")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(2)
    seeds = [0] if args.quick else list(range(args.seeds))
    archs = ("bn_cnn",) if args.quick else ("bn_cnn", "test_resnet")
    sparsities = (0.5,) if args.quick else SPARSITIES
    cpu = platform.processor() or platform.machine()
    out = RESULTS / ("pruning_quick.json" if args.quick else "pruning.json")
    previous = json.loads(out.read_text()) if out.exists() else {}
    results: dict[str, Any] = {"machine": f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    if args.timing_only:
        for key in ("vision_runs", "vision_summary", "vision_seconds", "text_runs", "text_summary"):
            results[key] = previous[key]
    else:
        start = time.perf_counter()
        results["vision_runs"] = bench_vision(archs, seeds, sparsities)
        results["vision_summary"] = summarise(results["vision_runs"], "acc")
        results["vision_seconds"] = time.perf_counter() - start
    if args.skip_text or args.timing_only:
        for key in ("text_runs", "text_summary"):
            results[key] = previous.get(key, [])
    else:
        results["text_runs"] = bench_text(seeds, sparsities, pretrain_epochs=1 if args.quick else 4, epochs=4)
        results["text_summary"] = summarise(results["text_runs"], "ppl")
    if args.skip_timing:
        results["timing"], results["inference"] = previous.get("timing"), previous.get("inference")
    else:
        results["timing"] = bench_step_time(epochs=3, rounds=1 if args.quick else 5)
        results["inference"] = bench_inference(SPARSITIES)
    print(write_results(results, out, markdown, None if args.quick else CARD))


if __name__ == "__main__":
    main()
