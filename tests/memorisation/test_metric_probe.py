"""Tests of ``MemorisationScore`` (incl. a 2-process gloo sync without a Trainer) and ``build_probe``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.utilities.data import dim_zero_sum

from lightning_ft.memorisation.functional import exact_match, ngram_memorisation_score, token_accuracy
from lightning_ft.memorisation.metrics import MemorisationScore
from lightning_ft.memorisation.probe import Probe, build_probe

# --------------------------------------------------------------------------------------------------------------------
# MemorisationScore
# --------------------------------------------------------------------------------------------------------------------


def _batches(seed: int = 0, sizes: tuple[int, ...] = (3, 5, 1, 4), length: int = 10) -> list[tuple]:
    """(generated, reference) batches with some exact copies, some partial copies and some unrelated rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        reference = torch.randint(0, 6, (size, length), generator=g)
        keep = torch.rand(size, 1, generator=g) * 1.2  # per-row copy rate; > 1 means an exact copy
        noise = torch.randint(0, 6, (size, length), generator=g)
        generated = torch.where(torch.rand(size, length, generator=g) < keep, reference, noise)
        out.append((generated, reference))
    return out


def _expected(batches: list[tuple], n=(2, 3), match="bag") -> dict[str, torch.Tensor]:
    gen = torch.cat([b[0] for b in batches])
    ref = torch.cat([b[1] for b in batches])
    return {
        "ngram": ngram_memorisation_score(gen, ref, n, match).mean(),
        "exact": exact_match(gen, ref).mean(),
        "token_acc": token_accuracy(gen, ref).mean(),
    }


@pytest.mark.parametrize("match", ["bag", "positional"])
def test_metric_compute_equals_mean_of_functional_scores_over_updates(match: str) -> None:
    batches = _batches()
    metric = MemorisationScore(n=(2, 3), match=match)
    for generated, reference in batches:
        metric.update(generated, reference)
    result = metric.compute()
    assert set(result) == {"ngram", "exact", "token_acc"}
    expected = _expected(batches, match=match)
    assert 0 < expected["exact"] < 1  # the data has both exact copies and non-copies
    for key, value in expected.items():
        torch.testing.assert_close(result[key], value.float())
    assert int(metric.total) == sum(b[0].shape[0] for b in batches)


def test_metric_last_scores_holds_the_batch_per_sample_scores() -> None:
    metric = MemorisationScore(n=(2,))
    for generated, reference in _batches(seed=1):
        metric.update(generated, reference)
        expected = torch.stack(
            [
                ngram_memorisation_score(generated, reference, (2,)),
                exact_match(generated, reference),
                token_accuracy(generated, reference),
            ],
            dim=1,
        )
        torch.testing.assert_close(metric.last_scores, expected)
    metric.update(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))  # one 1-D sample: a (1, 3) row
    assert metric.last_scores.shape == (1, 3)


def test_metric_single_sample_and_docstring_example() -> None:
    metric = MemorisationScore(n=(2,))
    metric.update(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]]))
    result = {k: round(v.item(), 3) for k, v in metric.compute().items()}
    assert result == {"ngram": 0.667, "exact": 0.0, "token_acc": 0.75}
    metric.update(torch.tensor([7, 8, 9]), torch.tensor([7, 8, 9]))  # a 1-D sample counts as one sample
    assert int(metric.total) == 2
    assert metric.compute()["exact"].item() == 0.5


def test_metric_reset_clears_the_states() -> None:
    first, second = _batches(seed=2), _batches(seed=3, sizes=(2, 6))
    metric = MemorisationScore(n=(2, 3))
    for generated, reference in first:
        metric.update(generated, reference)
    metric.compute()
    metric.reset()
    assert int(metric.total) == 0
    assert float(metric.ngram_sum) == float(metric.exact_sum) == float(metric.token_acc_sum) == 0.0
    for generated, reference in second:
        metric.update(generated, reference)
    for key, value in _expected(second).items():
        torch.testing.assert_close(metric.compute()[key], value.float())


def test_metric_states_are_summed_across_ranks() -> None:
    metric = MemorisationScore()
    names = ("ngram_sum", "exact_sum", "token_acc_sum", "total")
    assert set(metric._defaults) == set(names)
    for name in names:
        assert metric._reductions[name] is dim_zero_sum, name
    assert metric.full_state_update is False
    assert metric.higher_is_better is False


def test_metric_argument_validation() -> None:
    with pytest.raises(ValueError, match="`n`"):
        MemorisationScore(n=())
    with pytest.raises(ValueError, match="`n`"):
        MemorisationScore(n=(0, 2))
    with pytest.raises(ValueError, match="match"):
        MemorisationScore(match="foo")  # type: ignore[arg-type]
    metric = MemorisationScore()
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TypeError):
        metric.update(torch.ones(2, 4), torch.ones(2, 4))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DDP_SPLIT = 5  # rank 0 gets rows [:5], rank 1 the rest: uneven shards


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Module-level so that torch.multiprocessing spawn can pickle it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        generated, reference = _ddp_data()
        rows = slice(0, _DDP_SPLIT) if rank == 0 else slice(_DDP_SPLIT, None)
        metric = MemorisationScore(n=(2, 3))
        # two updates per rank
        shard_gen, shard_ref = generated[rows], reference[rows]
        metric.update(shard_gen[:2], shard_ref[:2])
        metric.update(shard_gen[2:], shard_ref[2:])
        result = {key: value.clone() for key, value in metric.compute().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    generated = torch.cat([b[0] for b in _batches(seed=5, sizes=(4, 4, 4))])
    reference = torch.cat([b[1] for b in _batches(seed=5, sizes=(4, 4, 4))])
    return generated, reference


# "fork" skips re-importing lightning_ft in each child (~10 s per child on a busy 2-core machine); the worker still
# runs in separate processes with their own process group. Fall back to "spawn" where fork does not exist.
_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@pytest.mark.ddp
def test_metric_two_process_gloo_sync_equals_single_process(tmp_path: Path) -> None:
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=_START_METHOD
    )
    generated, reference = _ddp_data()
    single = MemorisationScore(n=(2, 3))
    single.update(generated, reference)
    expected = single.compute()
    # the shards differ, so a missing sync would be visible
    local = MemorisationScore(n=(2, 3))
    local.update(generated[:_DDP_SPLIT], reference[:_DDP_SPLIT])
    assert not torch.allclose(local.compute()["ngram"], expected["ngram"])
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("ngram", "exact", "token_acc"):
            torch.testing.assert_close(result[key], expected[key], msg=f"rank {rank} {key}")


# --------------------------------------------------------------------------------------------------------------------
# build_probe
# --------------------------------------------------------------------------------------------------------------------


def _dataset(n: int = 20, length: int = 16) -> list[torch.Tensor]:
    return [torch.arange(length) + 1000 * i for i in range(n)]


def test_prefix_split_shapes_and_values() -> None:
    data = _dataset()
    probe = build_probe(data, probe_size=6, prefix_len=4, suffix_len=5, seed=0)
    assert isinstance(probe, Probe)
    assert len(probe) == 6
    assert probe.indices.dtype == torch.long and probe.indices.shape == (6,)
    assert probe.suffixes.shape == (6, 5) and probe.suffixes.dtype == torch.long
    assert len(probe.prefixes) == 6
    for row, idx in enumerate(probe.indices.tolist()):
        torch.testing.assert_close(probe.prefixes[row], data[idx][:4])
        torch.testing.assert_close(probe.suffixes[row], data[idx][4:9])
    batch = probe.prefix_batch(torch.tensor([0, 2]))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 4)


def test_prefix_split_accepts_lists_tuples_and_exact_lengths() -> None:
    lists = [list(range(10 * i, 10 * i + 9)) for i in range(4)]  # exactly prefix_len + suffix_len tokens
    probe = build_probe(lists, probe_size=4, prefix_len=5, suffix_len=4)
    assert probe.indices.tolist() == [0, 1, 2, 3]
    assert probe.suffixes[1].tolist() == [15, 16, 17, 18]
    tuples = [(torch.tensor(x), 0) for x in lists]  # (ids, label) pairs: the ids are the first element
    probe = build_probe(tuples, probe_size=2, prefix_len=5, suffix_len=4, indices=[3, 0])
    assert probe.prefixes[0].tolist() == [30, 31, 32, 33, 34]


def test_probe_size_larger_than_dataset_takes_everything() -> None:
    probe = build_probe(_dataset(5), probe_size=50, prefix_len=2, suffix_len=2)
    assert probe.indices.tolist() == [0, 1, 2, 3, 4]


def _instruction_sample(prompt: list[int], response: list[int], pad: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.tensor(prompt + response + [0] * pad)
    labels = torch.tensor([-100] * len(prompt) + response + [-100] * pad)
    mask = torch.tensor([1] * (len(prompt) + len(response)) + [0] * pad)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_labels_split_prompt_is_everything_before_first_supervised_token() -> None:
    data = [
        _instruction_sample([1, 2, 3], [10, 11, 12, 13]),
        _instruction_sample([4, 5, 6, 7, 8], [20, 21, 22], pad=3),
        _instruction_sample([9], [30, 31, 32, 33, 34]),
    ]
    probe = build_probe(data, probe_size=3, prefix_len=None, suffix_len=3, split="labels")
    assert probe.indices.tolist() == [0, 1, 2]
    assert [p.tolist() for p in probe.prefixes] == [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    assert probe.suffixes.tolist() == [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
    assert isinstance(probe.prefix_batch(torch.arange(3)), list)  # different prompt lengths
    # prefix_len keeps the last prefix_len prompt tokens
    probe = build_probe(data, probe_size=3, prefix_len=2, suffix_len=2, split="labels")
    assert [p.tolist() for p in probe.prefixes] == [[2, 3], [7, 8], [9]]
    assert probe.suffixes.tolist() == [[10, 11], [20, 21], [30, 31]]


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        ({"input_ids": torch.arange(6)}, "no labels"),
        ({"input_ids": torch.arange(6), "labels": torch.full((6,), -100)}, "no supervised"),
        ({"input_ids": torch.arange(6), "labels": torch.arange(6)}, "no prompt"),
        (_instruction_sample([1, 2], [3, 4]), "suffix_len"),
    ],
)
def test_labels_split_rejects_unusable_samples(sample: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        build_probe([sample], probe_size=1, prefix_len=None, suffix_len=3, split="labels")


def test_seeded_sampling_is_deterministic_and_sorted() -> None:
    data = _dataset(50)
    first = build_probe(data, probe_size=8, prefix_len=3, suffix_len=3, seed=123)
    second = build_probe(data, probe_size=8, prefix_len=3, suffix_len=3, seed=123)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.suffixes, second.suffixes)
    indices = first.indices.tolist()
    assert indices == sorted(indices) and len(set(indices)) == 8
    assert all(0 <= i < 50 for i in indices)
    others = {tuple(build_probe(data, 8, 3, 3, seed=s).indices.tolist()) for s in range(5)}
    assert len(others) > 1  # the seed matters
    assert indices != list(range(8))  # a sample, not the first rows


def test_indices_reproduce_the_probe_in_the_given_order() -> None:
    data = _dataset(30)
    probe = build_probe(data, probe_size=5, prefix_len=3, suffix_len=4, seed=7)
    again = build_probe(data, probe_size=999, prefix_len=3, suffix_len=4, seed=99, indices=probe.indices.tolist())
    assert torch.equal(again.indices, probe.indices)
    assert torch.equal(again.suffixes, probe.suffixes)
    assert all(torch.equal(a, b) for a, b in zip(again.prefixes, probe.prefixes, strict=True))
    reordered = build_probe(data, probe_size=2, prefix_len=3, suffix_len=4, indices=[9, 2])
    assert reordered.indices.tolist() == [9, 2]
    torch.testing.assert_close(reordered.suffixes[0], data[9][3:7])


def test_short_samples_raise_naming_prefix_and_suffix_len() -> None:
    data = [*_dataset(4, length=16), torch.arange(5)]
    with pytest.raises(ValueError, match="prefix_len") as info:
        build_probe(data, probe_size=5, prefix_len=4, suffix_len=4)
    assert "suffix_len" in str(info.value) and "short_samples" in str(info.value)


def test_short_samples_skip_probes_only_long_enough_samples() -> None:
    data = [torch.arange(16) if i % 3 else torch.arange(5) for i in range(12)]  # 0, 3, 6, 9 are short
    probe = build_probe(data, probe_size=50, prefix_len=4, suffix_len=4, short_samples="skip")
    assert probe.indices.tolist() == [1, 2, 4, 5, 7, 8, 10, 11]
    probe = build_probe(data, probe_size=3, prefix_len=4, suffix_len=4, short_samples="skip", seed=1)
    assert len(probe) == 3 and all(i % 3 for i in probe.indices.tolist())
    # given indices never skip silently
    with pytest.raises(ValueError, match="prefix_len"):
        build_probe(data, probe_size=2, prefix_len=4, suffix_len=4, short_samples="skip", indices=[1, 3])
    with pytest.raises(ValueError, match="long enough"):
        build_probe([torch.arange(3)] * 4, probe_size=2, prefix_len=4, suffix_len=4, short_samples="skip")


def test_dict_samples_trim_right_padding_with_attention_mask() -> None:
    sample = {
        "input_ids": torch.tensor([5, 6, 7, 8, 0, 0]),
        "attention_mask": torch.tensor([1, 1, 1, 1, 0, 0]),
    }
    probe = build_probe([sample], probe_size=1, prefix_len=2, suffix_len=2)
    assert probe.prefixes[0].tolist() == [5, 6]
    assert probe.suffixes.tolist() == [[7, 8]]
    with pytest.raises(ValueError, match="4 tokens"):  # padding does not count as tokens
        build_probe([sample], probe_size=1, prefix_len=2, suffix_len=3)
    unmasked = {"input_ids": sample["input_ids"]}
    assert build_probe([unmasked], 1, prefix_len=2, suffix_len=3).suffixes.tolist() == [[7, 8, 0]]
    lists = {"tokens": [5, 6, 7, 8, 0], "attention_mask": [1, 1, 1, 1, 0]}
    assert build_probe([lists], 1, 2, 2, input_key="tokens").suffixes.tolist() == [[7, 8]]


def test_dict_sample_without_the_input_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="input_ids"):
        build_probe([{"ids": torch.arange(8)}], probe_size=1, prefix_len=2, suffix_len=2)


def test_float_or_2d_samples_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer token ids"):
        build_probe([torch.rand(8)], probe_size=1, prefix_len=2, suffix_len=2)
    with pytest.raises(ValueError, match="1-D"):
        build_probe([torch.ones(2, 8, dtype=torch.long)], probe_size=1, prefix_len=2, suffix_len=2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        pytest.param({"probe_size": 0}, "probe_size", id="probe_size=0"),
        pytest.param({"probe_size": -3}, "probe_size", id="probe_size=-3"),
        pytest.param({"suffix_len": 0}, "suffix_len", id="suffix_len=0"),
        pytest.param({"prefix_len": 0}, "prefix_len", id="prefix_len=0"),
        pytest.param({"prefix_len": None}, "prefix_len", id="prefix_len=None-split=prefix"),
        pytest.param({"split": "suffix"}, "split", id="split=suffix"),
        pytest.param({"short_samples": "ignore"}, "short_samples", id="short_samples=ignore"),
    ],
)
def test_invalid_probe_arguments_are_rejected(kwargs: dict, name: str) -> None:
    """Misconfiguration must fail loudly, e.g. probe_size=0 must not silently probe the whole dataset."""
    arguments = {"probe_size": 2, "prefix_len": 2, "suffix_len": 2, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        build_probe(_dataset(6), **arguments)


def test_empty_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_probe([], probe_size=4, prefix_len=2, suffix_len=2)
