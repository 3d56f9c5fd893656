"""FLOW on a toy forgetting setup: does upweighting easy samples keep task A while fine-tuning on task B?

An MLP (64-128-128-10) learns task A (scikit-learn digits, 8x8, 1,200 training images, Adam 1e-3, 30 epochs), then
fine-tunes 15 epochs on 600 images of a task B: inverted images (``1 - x``) with labels shifted by ``shift`` (0: same
labels, a domain shift the pre-trained model partly solves; 3: a conflicting relabelling it cannot). FLOW weights the
task-B loss by ``exp(-ref_loss / median)`` from the task-A model (``normalize`` none and mean1). Paired seeds: every
variant starts from the same task-A model and sees the same batches. Retention = task-A test accuracy after, task B =
task-B test accuracy; the paired difference to plain fine-tuning is reported with a 95% t-interval.

Controls (no information about which samples are easy): ``flow_constant`` weights every sample by the mean of FLOW's
weights (the smaller step of unnormalised weights, nothing else), ``flow_shuffled`` uses FLOW's weights permuted
across samples (same distribution, no relation to the sample).

Writes ``benchmarks/results/flow_digits[_sgd].json`` and ``.md``. Usage:
python benchmarks/flow_digits.py [--seeds 8] [--optimizer adam|sgd]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import paired_ci, put_mean_std
from torch import Tensor, nn

from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.rehearsal import flow_weights

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("plain", "flow", "flow_mean1", "flow_constant", "flow_shuffled")


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, weights: Tensor | None = None, sgd: bool = False
) -> None:
    if sgd:  # SGD's step scales with the loss weights; Adam's is invariant to a constant scale
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 32):
            idx = order[start : start + 32]
            losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
            loss = losses.mean() if weights is None else (weights[idx] * losses).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def variant_weights(variant: str, ref: Tensor, seed: int) -> Tensor | None:
    """The per-sample loss weights of ``variant`` (None: plain mean)."""
    if variant == "plain":
        return None
    weights = flow_weights(ref, normalize="mean1" if variant == "flow_mean1" else "none")
    if variant == "flow_constant":
        return torch.full_like(weights, float(weights.mean()))
    if variant == "flow_shuffled":
        return weights[torch.randperm(len(weights), generator=torch.Generator().manual_seed(seed))]
    return weights


def run(shift: int, seeds: int, sgd: bool = False) -> dict:
    images, labels = load_digits_tensors(8)
    x = images.flatten(1)
    xb, yb = 1 - x, (labels + shift) % 10
    rows = []
    for seed in range(seeds):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        train_idx, test_idx, b_idx = perm[:1200], perm[1200:], perm[:600]
        base = mlp(seed)
        train(base, x[train_idx], labels[train_idx], 30, seed)
        with torch.no_grad():
            ref = F.cross_entropy(base(xb[b_idx]), yb[b_idx], reduction="none")
        row = {"seed": seed, "a_before": accuracy(base, x[test_idx], labels[test_idx])}
        for variant in VARIANTS:
            model = mlp(seed)
            model.load_state_dict(base.state_dict())
            train(model, xb[b_idx], yb[b_idx], 15, seed, variant_weights(variant, ref, seed), sgd)
            row[variant] = {
                "a": accuracy(model, x[test_idx], labels[test_idx]),
                "b": accuracy(model, xb[test_idx], yb[test_idx]),
            }
        rows.append(row)
    summary = {}
    for variant in VARIANTS:
        entry = {}
        for metric in ("a", "b"):
            mean, low, high = paired_ci([r[variant][metric] - r["plain"][metric] for r in rows])
            put_mean_std(entry, metric, [r[variant][metric] for r in rows])
            entry[f"{metric}_diff"] = mean
            entry[f"{metric}_diff_ci"] = [low, high]
        summary[variant] = entry
    return {
        "shift": shift,
        "seeds": seeds,
        "optimizer": "sgd" if sgd else "adam",
        "a_before": statistics.fmean(r["a_before"] for r in rows),
        "runs": rows,
        "summary": summary,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| task B | variant | task-A acc after (retention) | task-B acc | retention vs plain (95% CI)"
        " | task B vs plain (95% CI) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        name = "inverted, same labels" if result["shift"] == 0 else f"inverted, labels +{result['shift']}"
        for variant, e in result["summary"].items():
            a_lo, a_hi = e["a_diff_ci"]
            b_lo, b_hi = e["b_diff_ci"]
            diff = "" if variant == "plain" else f"{e['a_diff']:+.3f} [{a_lo:+.3f}, {a_hi:+.3f}]"
            diff_b = "" if variant == "plain" else f"{e['b_diff']:+.3f} [{b_lo:+.3f}, {b_hi:+.3f}]"
            lines.append(
                f"| {name} | {variant} | {e['a']:.3f} ± {e['a_std']:.3f} | {e['b']:.3f} ± {e['b_std']:.3f}"
                f" | {diff} | {diff_b} |"
            )
    seeds, optimizer = results[0]["seeds"], results[0].get("optimizer", "adam")
    lines.append(
        f"\n{seeds} paired seeds, {optimizer}; task-A accuracy before fine-tuning {results[0]['a_before']:.3f}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sgd = args.optimizer == "sgd"
    results = [run(shift, args.seeds, sgd) for shift in (0, 3)]
    RESULTS.mkdir(exist_ok=True)
    stem = "flow_digits_sgd" if sgd else "flow_digits"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
