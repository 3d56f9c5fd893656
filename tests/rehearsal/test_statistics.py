"""ReferenceStatistics (method card rehearsal.md §4, §9): per-sample reference loss and correctness by stable sample
id for classifiers and causal LMs, lookup, dedupe of repeated ids, save/load, errors; 2-process DDP gathering."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.rehearsal import ReferenceStatistics, WithSampleIds, batch_sample_ids
from tests.helpers.data import digits
from tests.helpers.ddp import load_script, run_ddp_script
from tests.helpers.models import tiny_classifier, tiny_lm

N_DIGITS = 150


@pytest.fixture(scope="module")
def digit_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits()
    return x[:N_DIGITS], y[:N_DIGITS]


def digit_loader(data, batch_size: int = 32, shuffle: bool = False, seed: int = 0, offset: int = 0) -> DataLoader:
    ds = WithSampleIds(TensorDataset(*data), offset=offset)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def exact(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert a is not None and b is not None
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------------------------------
# WithSampleIds and batch_sample_ids
# --------------------------------------------------------------------------------------------------------------------


def test_with_sample_ids_tuple_mapping_and_plain_samples():
    tuples = WithSampleIds(TensorDataset(torch.arange(4.0), torch.arange(4)), offset=10)
    assert len(tuples) == 4
    x, y, i = tuples[2]
    assert float(x) == 2.0 and int(y) == 2 and i == 12
    mapping = WithSampleIds([{"input_ids": torch.tensor([1, 2])}], key="sid")
    assert mapping[0]["sid"] == 0 and mapping[0]["input_ids"].tolist() == [1, 2]
    plain = WithSampleIds([torch.tensor(5.0)], offset=3)
    assert plain[0][1] == 3 and float(plain[0][0]) == 5.0


@pytest.mark.parametrize("offset", [-1, 1.5, True, "0"])
def test_with_sample_ids_rejects_bad_offsets(offset):
    with pytest.raises(ValueError, match="offset"):
        WithSampleIds([1, 2], offset=offset)  # type: ignore[arg-type]


def test_batch_sample_ids():
    assert batch_sample_ids({"sample_id": torch.tensor([3, 1])}).tolist() == [3, 1]
    assert batch_sample_ids({"sid": [4, 5]}, key="sid").dtype == torch.int64
    assert batch_sample_ids((torch.zeros(2, 3), torch.zeros(2), torch.tensor([7, 8]))).tolist() == [7, 8]
    with pytest.raises(ValueError, match="sample_id"):
        batch_sample_ids({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="sample ids"):
        batch_sample_ids(torch.zeros(2))
    with pytest.raises(ValueError, match="integer"):
        batch_sample_ids((torch.zeros(2), torch.tensor([0.5, 1.5])))
    with pytest.raises(ValueError, match="1-D"):
        batch_sample_ids((torch.zeros(2), torch.zeros(2, 2, dtype=torch.long)))


# --------------------------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------------------------


def test_classification_losses_and_correct_equal_manual_eval_mode(digit_data):
    model = tiny_classifier()
    model.train()
    frozen_bn = model.model.features[1]
    frozen_bn.eval()  # a submodule frozen in eval mode stays so
    bn_stats = frozen_bn.running_mean.clone(), model.model.features[4].running_mean.clone()

    stats = ReferenceStatistics.compute(model, digit_loader(digit_data))

    assert model.training and model.model.features[4].training and not frozen_bn.training
    # eval mode: BatchNorm running statistics untouched
    exact(frozen_bn.running_mean, bn_stats[0])
    exact(model.model.features[4].running_mean, bn_stats[1])
    x, y = digit_data
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert len(stats) == N_DIGITS and stats.token_nll is None
    assert stats.sample_ids.tolist() == list(range(N_DIGITS))
    assert stats.loss.dtype == torch.float32 and stats.correct.dtype == torch.bool
    torch.testing.assert_close(stats.loss, F.cross_entropy(logits, y, reduction="none"), rtol=1e-5, atol=1e-6)
    exact(stats.correct, logits.argmax(-1) == y)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_classification_statistics_are_stable_across_runs_batch_sizes_and_shuffling(digit_data):
    model = tiny_classifier(seed=3)
    first = ReferenceStatistics.compute(model, digit_loader(digit_data, batch_size=32))
    again = ReferenceStatistics.compute(model, digit_loader(digit_data, batch_size=32))
    exact(first.sample_ids, again.sample_ids)
    exact(first.loss, again.loss)
    exact(first.correct, again.correct)
    for batch_size, seed in ((7, 0), (64, 1), (N_DIGITS, 2)):
        other = ReferenceStatistics.compute(model, digit_loader(digit_data, batch_size, shuffle=True, seed=seed))
        exact(first.sample_ids, other.sample_ids)
        torch.testing.assert_close(first.loss, other.loss, rtol=1e-5, atol=1e-6)
        exact(first.correct, other.correct)


def test_offset_ids_and_mapping_batches(digit_data):
    model = tiny_classifier()
    x, y = digit_data
    by_tuple = ReferenceStatistics.compute(model, digit_loader(digit_data, offset=1000))
    assert by_tuple.sample_ids.tolist() == list(range(1000, 1000 + N_DIGITS))
    for x_key, y_key in (("image", "label"), ("pixel_values", "labels"), ("x", "y")):
        samples = [{x_key: x[i], y_key: y[i]} for i in range(N_DIGITS)]
        by_map = ReferenceStatistics.compute(model, DataLoader(WithSampleIds(samples, offset=1000), batch_size=32))
        exact(by_map.sample_ids, by_tuple.sample_ids)
        torch.testing.assert_close(by_map.loss, by_tuple.loss)
        exact(by_map.correct, by_tuple.correct)


def test_correct_fn_override(digit_data):
    model = tiny_classifier()
    seen = []

    def even_label(logits, batch):
        seen.append(logits.shape)
        return batch[1] % 2 == 0

    stats = ReferenceStatistics.compute(model, digit_loader(digit_data), correct_fn=even_label)
    exact(stats.correct, digit_data[1] % 2 == 0)
    assert seen[0] == (32, 10) and len(seen) == math.ceil(N_DIGITS / 32)


# --------------------------------------------------------------------------------------------------------------------
# causal LM
# --------------------------------------------------------------------------------------------------------------------

SEQ = 12


@pytest.fixture(scope="module")
def lm_samples() -> list[dict[str, torch.Tensor]]:
    """Prompt/response samples (labels -100 on the prompt), one without any supervised next token."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(7):
        ids = torch.randint(0, 1024, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: 1 + i] = -100
        samples.append({"input_ids": ids, "labels": labels})
    samples[3]["labels"] = torch.full((SEQ,), -100)
    samples[3]["labels"][0] = samples[3]["input_ids"][0]  # only position 0: nothing after the shift
    return samples


def manual_lm(model, samples):
    """Per-sample mean NLL, per-token NLL (NaN unsupervised) and greedy accuracy, one sample at a time."""
    losses, tokens, accuracy = [], [], []
    model.eval()
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=sample["input_ids"][None]).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            row = torch.full((SEQ - 1,), math.nan, dtype=torch.float64)
            hits = []
            for t in range(SEQ - 1):
                target = int(sample["labels"][t + 1])
                if target != -100:
                    row[t] = -logp[t, target]
                    hits.append(int(logits[t].argmax()) == target)
            sup = row[~row.isnan()]
            losses.append(float(sup.mean()) if len(sup) else math.nan)
            tokens.append(row)
            accuracy.append(sum(hits) / len(hits) if hits else math.nan)
    return torch.tensor(losses), torch.stack(tokens), accuracy


def test_causal_lm_loss_and_token_nll_equal_manual_values(lm_samples):
    model = tiny_lm(seed=0)
    model.train()
    loader = DataLoader(WithSampleIds(lm_samples, offset=20), batch_size=3)
    stats = ReferenceStatistics.compute(model, loader, task="causal_lm", store_token_nll=True)
    assert model.training
    loss, token_nll, accuracy = manual_lm(model, lm_samples)
    assert stats.sample_ids.tolist() == list(range(20, 27))
    torch.testing.assert_close(stats.loss, loss.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert math.isnan(stats.loss[3].item())
    assert stats.token_nll is not None and stats.token_nll.shape == (7, SEQ - 1)
    torch.testing.assert_close(stats.token_nll, token_nll.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    for i, sample in enumerate(lm_samples):  # NaN exactly at the unsupervised (shifted) positions
        exact(stats.token_nll[i].isnan(), sample["labels"][1:] == -100)
    # correctness: greedy next-token accuracy >= 0.5; never for a sample without supervised tokens
    expected = [not math.isnan(a) and a >= 0.5 for a in accuracy]
    assert stats.correct.tolist() == expected
    everything = ReferenceStatistics.compute(model, loader, task="causal_lm", lm_correct_threshold=0.0)
    assert everything.correct.tolist() == [i != 3 for i in range(7)]
    assert everything.token_nll is None


def test_causal_lm_without_labels_uses_input_ids_and_honours_attention_mask(lm_samples):
    model = tiny_lm(seed=0)
    plain = [{"input_ids": s["input_ids"]} for s in lm_samples]
    stats = ReferenceStatistics.compute(model, DataLoader(WithSampleIds(plain), batch_size=4), task="causal_lm")
    full_labels = [{"input_ids": s["input_ids"], "labels": s["input_ids"]} for s in lm_samples]
    loss, _, _ = manual_lm(model, full_labels)
    torch.testing.assert_close(stats.loss, loss.float(), rtol=1e-5, atol=1e-6)
    # an attention mask reaches the model (left-masking the first tokens changes the losses)
    masked = [{**s, "attention_mask": (torch.arange(SEQ) >= 4).long()} for s in plain]
    with_mask = ReferenceStatistics.compute(model, DataLoader(WithSampleIds(masked), batch_size=4), task="causal_lm")
    assert not torch.allclose(with_mask.loss, stats.loss)


def test_causal_lm_correct_fn_override(lm_samples):
    stats = ReferenceStatistics.compute(
        tiny_lm(seed=0),
        DataLoader(WithSampleIds(lm_samples), batch_size=4),
        task="causal_lm",
        correct_fn=lambda logits, batch: batch["sample_id"] % 2 == 0,
    )
    assert stats.correct.tolist() == [i % 2 == 0 for i in range(7)]


# --------------------------------------------------------------------------------------------------------------------
# construction, lookup, save/load
# --------------------------------------------------------------------------------------------------------------------


def test_construction_sorts_by_id_and_checks_shapes_and_uniqueness():
    stats = ReferenceStatistics(
        torch.tensor([5, 2, 9]),
        torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64),
        torch.tensor([1, 0, 1]),
        torch.tensor([[5.0], [2.0], [9.0]]),
    )
    assert stats.sample_ids.tolist() == [2, 5, 9]
    assert stats.loss.tolist() == pytest.approx([0.2, 0.5, 0.9]) and stats.loss.dtype == torch.float32
    assert stats.correct.tolist() == [False, True, True]
    assert stats.token_nll is not None and stats.token_nll[:, 0].tolist() == [2.0, 5.0, 9.0]
    with pytest.raises(ValueError, match="unique"):
        ReferenceStatistics(torch.tensor([1, 2, 1]), torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        ReferenceStatistics(torch.tensor([1, 2]), torch.zeros(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_nll"):
        ReferenceStatistics(torch.tensor([1, 2]), torch.zeros(2), torch.zeros(2, dtype=torch.bool), torch.zeros(3, 4))


def test_positions_and_missing_ids():
    stats = ReferenceStatistics(torch.tensor([30, 10, 20]), torch.tensor([3.0, 1.0, 2.0]), torch.ones(3).bool())
    pos = stats.positions(torch.tensor([20, 30, 10, 20]))
    assert pos.tolist() == [1, 2, 0, 1]
    assert stats.loss[pos].tolist() == [2.0, 3.0, 1.0, 2.0]
    for missing in ([12345], [10, 15], [5], [31]):
        with pytest.raises(KeyError, match=str(missing[-1])):
            stats.positions(torch.tensor(missing))
    empty = ReferenceStatistics(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert len(empty) == 0
    with pytest.raises(KeyError, match="4"):
        empty.positions(torch.tensor([4]))


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.integers(0, 10_000), min_size=1, max_size=40, unique=True),
    data=st.data(),
)
def test_positions_property(ids, data):
    losses = torch.tensor([float(i) / 7 for i in ids])
    stats = ReferenceStatistics(torch.tensor(ids), losses, torch.tensor([i % 3 == 0 for i in ids]))
    query = data.draw(st.lists(st.sampled_from(ids), max_size=30))
    pos = stats.positions(torch.tensor(query, dtype=torch.long))
    assert stats.sample_ids[pos].tolist() == query
    assert stats.loss[pos].tolist() == pytest.approx([float(i) / 7 for i in query])
    absent = data.draw(st.integers(-5, 10_010).filter(lambda i: i not in set(ids)))
    at = data.draw(st.integers(0, len(query)))
    with pytest.raises(KeyError, match=str(absent)):
        stats.positions(torch.tensor([*query[:at], absent, *query[at:]], dtype=torch.long))


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _features(ids: list[int]) -> torch.Tensor:
    i = torch.tensor(ids, dtype=torch.float32)[:, None]
    return torch.sin(i * torch.arange(1, 5))


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=6), min_size=1, max_size=6),
)
def test_repeated_ids_are_kept_once(batches):
    """Repeated ids (as a DistributedSampler's padding makes them) appear once, with their own statistics."""
    model = _linear_model()
    loader = [(_features(b), torch.tensor(b) % 3, torch.tensor(b)) for b in batches]
    stats = ReferenceStatistics.compute(model, loader)
    unique = sorted({i for b in batches for i in b})
    assert stats.sample_ids.tolist() == unique
    with torch.no_grad():
        expected = F.cross_entropy(model(_features(unique)), torch.tensor(unique) % 3, reduction="none")
    torch.testing.assert_close(stats.loss, expected, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path, lm_samples, digit_data):
    lm_stats = ReferenceStatistics.compute(
        tiny_lm(seed=0), DataLoader(WithSampleIds(lm_samples), batch_size=4), task="causal_lm", store_token_nll=True
    )
    path = tmp_path / "nested" / "lm.pt"
    lm_stats.save(path)
    back = ReferenceStatistics.load(path)
    exact(back.sample_ids, lm_stats.sample_ids)
    exact(back.loss, lm_stats.loss)  # holds a NaN
    exact(back.correct, lm_stats.correct)
    exact(back.token_nll, lm_stats.token_nll)

    cls_stats = ReferenceStatistics.compute(tiny_classifier(), digit_loader(digit_data, offset=7))
    cls_stats.save(tmp_path / "cls.pt")
    back = ReferenceStatistics.load(tmp_path / "cls.pt")
    assert back.token_nll is None
    exact(back.sample_ids, cls_stats.sample_ids)
    exact(back.loss, cls_stats.loss)
    exact(back.correct, cls_stats.correct)


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


def test_compute_errors(digit_data, lm_samples):
    model = tiny_classifier()
    with pytest.raises(ValueError, match="empty"):
        ReferenceStatistics.compute(model, DataLoader(WithSampleIds(TensorDataset(torch.zeros(0, 1, 8, 8))), 4))
    with pytest.raises(ValueError, match="empty"):
        ReferenceStatistics.compute(model, [])
    # tuple batches without ids: (inputs, labels) is not enough
    with pytest.raises(ValueError, match="ids"):
        ReferenceStatistics.compute(model, DataLoader(TensorDataset(*digit_data), batch_size=8))
    with pytest.raises(ValueError, match="image/label"):
        ReferenceStatistics.compute(model, DataLoader(WithSampleIds([{"img": digit_data[0][0]}]), batch_size=1))
    with pytest.raises(ValueError, match="store_token_nll"):
        ReferenceStatistics.compute(model, digit_loader(digit_data), store_token_nll=True)
    with pytest.raises(ValueError, match="task"):
        ReferenceStatistics.compute(model, digit_loader(digit_data), task="regression")  # type: ignore[arg-type]
    # causal-LM batches without ids
    with pytest.raises(ValueError, match="sample_id"):
        ReferenceStatistics.compute(tiny_lm(seed=0), DataLoader(lm_samples, batch_size=4), task="causal_lm")
    # ids under another key
    with pytest.raises(ValueError, match="'uid'"):
        ReferenceStatistics.compute(
            tiny_lm(seed=0), DataLoader(WithSampleIds(lm_samples), batch_size=4), task="causal_lm", id_key="uid"
        )


# --------------------------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.ddp
def test_ddp_ranks_return_identical_statistics_equal_to_one_process(tmp_path):
    r0, r1 = run_ddp_script("ddp_reference_statistics.py", tmp_path / "ddp")
    assert r0["rank"] == 0 and r1["rank"] == 1 and r0["world_size"] == r1["world_size"] == 2
    # one process (no process group here) over the whole data, with the script's own data and models
    script = load_script("ddp_reference_statistics")
    cls_data, lm_data = script.datasets()
    classifier, lm = script.models()
    single = {
        "cls": ReferenceStatistics.compute(classifier, DataLoader(cls_data, batch_size=32)),
        "lm": ReferenceStatistics.compute(
            lm, DataLoader(lm_data, batch_size=4), task="causal_lm", store_token_nll=True
        ),
    }
    for task in ("cls", "lm"):
        n = r0[f"n_{task}"]
        assert n % 2 == 1
        # the sampler padded one shard with a repeated sample: n + 1 rows over the ranks, each id once after the gather
        shards = r0[f"shard_{task}"] + r1[f"shard_{task}"]
        assert len(shards) == n + 1 and len(set(shards)) == n
        for key in ("sample_ids", "loss", "correct", "token_nll"):
            assert r0[task][key] == r1[task][key], f"ranks differ on {task} {key}"
        ref = single[task]
        assert r0[task]["sample_ids"] == ref.sample_ids.tolist() == list(range(100, 100 + n))
        assert r0[task]["correct"] == ref.correct.tolist()
        torch.testing.assert_close(torch.tensor(r0[task]["loss"]), ref.loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert r0["cls"]["token_nll"] is None and single["lm"].token_nll is not None
    got = torch.tensor(r0["lm"]["token_nll"])
    torch.testing.assert_close(got, single["lm"].token_nll, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert any(math.isnan(v) for v in r0["lm"]["loss"])  # the NaN sample travelled through the gather


def test_zero_dimensional_ids_are_a_clear_error():
    with pytest.raises(ValueError, match="must all be"):
        ReferenceStatistics(torch.tensor(3), torch.tensor([0.1]), torch.tensor([True]))
