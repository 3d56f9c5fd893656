"""2-process CPU DDP run of ReferenceStatistics.compute over DistributedSampler shards of an odd number of samples.

Every rank computes statistics of a digits classifier and of a causal LM (with per-token NLL) over its own shard (the
sampler pads with a repeated sample) and dumps what it got; the test compares the ranks with a 1-process computation
over the whole data (``datasets()`` and ``models()`` are imported by the test for it).

Usage: python tests/scripts/ddp_reference_statistics.py --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_ft.rehearsal import ReferenceStatistics, WithSampleIds
from tests.helpers.data import digits
from tests.helpers.models import tiny_classifier, tiny_lm

N_CLS, N_LM, SEQ, OFFSET = 101, 9, 12, 100


def lm_samples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(N_LM):
        ids = torch.randint(0, 1024, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 5] = -100
        samples.append({"input_ids": ids, "labels": labels})
    samples[4]["labels"] = torch.full((SEQ,), -100)  # no supervised token: NaN loss
    return samples


def datasets() -> tuple[WithSampleIds, WithSampleIds]:
    """The classification and causal-LM data, ids ``OFFSET ..`` (odd sizes)."""
    x, y = digits()
    cls_data = WithSampleIds(TensorDataset(x[:N_CLS], y[:N_CLS]), offset=OFFSET)
    return cls_data, WithSampleIds(lm_samples(), offset=OFFSET)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The (seeded, identical on every rank) classifier and causal LM."""
    return tiny_classifier(), tiny_lm(seed=0)


def as_json(stats: ReferenceStatistics) -> dict:
    return {
        "sample_ids": stats.sample_ids.tolist(),
        "loss": stats.loss.tolist(),
        "correct": stats.correct.tolist(),
        "token_nll": None if stats.token_nll is None else stats.token_nll.tolist(),
    }


def loader(dataset, fabric: Fabric, batch_size: int) -> tuple[DataLoader, list[int]]:
    if fabric.world_size == 1:
        return DataLoader(dataset, batch_size=batch_size), list(range(len(dataset)))
    sampler = DistributedSampler(dataset, fabric.world_size, fabric.global_rank, shuffle=True, seed=0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler), [OFFSET + i for i in sampler]


def run(fabric: Fabric, out: Path) -> None:
    """Every rank's statistics of both models over its shards, dumped to ``out``."""
    cls_data, lm_data = datasets()
    classifier, lm = models()
    cls_loader, cls_shard = loader(cls_data, fabric, batch_size=16)
    cls_stats = ReferenceStatistics.compute(classifier, cls_loader)
    lm_loader, lm_shard = loader(lm_data, fabric, batch_size=2)
    lm_stats = ReferenceStatistics.compute(lm, lm_loader, task="causal_lm", store_token_nll=True)

    result = {
        "rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "n_cls": N_CLS,
        "n_lm": N_LM,
        "shard_cls": cls_shard,
        "shard_lm": lm_shard,
        "cls": as_json(cls_stats),
        "lm": as_json(lm_stats),
    }
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(result))
    fabric.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    try:
        run(fabric, args.out)
    finally:  # a process group left to the interpreter's exit can abort it ("terminate called ...", rc -6)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
