"""Token budgets (``budget="tokens"``): each batch rehearses pool samples until their tokens reach the share of the
batch's fine-tuning tokens (in expectation, small batches too); the same state on every rank; the data module counts
tokens; DDP."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ft.demos._common import cpu_trainer
from lightning_ft.demos.rehearsal_text import RehearsalLM
from lightning_ft.rehearsal import (
    STRATEGIES,
    CollateralDamageSampler,
    ReferenceStatistics,
    RehearsalFeedback,
    WithSampleIds,
    num_tokens,
)
from tests.helpers.data import pad_collate, token_budget_datamodule, variable_length_chunks
from tests.helpers.ddp import load_script, run_ddp_script
from tests.helpers.models import TINY_LM
from tests.rehearsal.test_text import Outputs

N, M, BATCH = 60, 200, 6


def lengths(n: int, seed: int, low: int = 1, high: int = 40) -> torch.Tensor:
    return torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(seed))


def make(**kwargs) -> CollateralDamageSampler:
    gen = torch.Generator().manual_seed(0)
    defaults = {
        "num_finetune": N,
        "pool_loss": torch.rand(M, generator=gen),
        "pool_correct": torch.rand(M, generator=gen) > 0.2,
        "batch_size": BATCH,
        "replay_ratio": 0.2,
        "budget": "tokens",
        "pool_lengths": lengths(M, 1),
        "finetune_lengths": lengths(N, 2),
    }
    return CollateralDamageSampler(**{**defaults, **kwargs})


def check_budgets(sampler: CollateralDamageSampler, batches: list[list[int]], share: float, n: int = N) -> None:
    """Every rehearsed sample of a batch starts below the batch's target (the last one may cross it)."""
    pool_len, ft_len = sampler._pool_lengths, sampler._finetune_lengths
    for batch in batches:
        ft = [i for i in batch if i < n]
        replay = [i - n for i in batch if i >= n]
        target = int(ft_len[ft].sum()) * share / (1 - share)
        tokens = int(pool_len[replay].sum())
        assert not replay or tokens - int(pool_len[replay[-1]]) < target, "no sample starts past the target"


def token_share(sampler: CollateralDamageSampler, batches: list[list[int]], n: int = N) -> float:
    ft = sum(int(sampler._finetune_lengths[[i for i in b if i < n]].sum()) for b in batches)
    replay = sum(int(sampler._pool_lengths[[i - n for i in b if i >= n]].sum()) for b in batches)
    return replay / (ft + replay)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_batch_rehearses_its_token_share(strategy):
    sampler = make(strategy=strategy)
    batches = list(sampler)
    assert len(batches) == 10
    check_budgets(sampler, batches, 0.2)
    counts = [sum(i >= N for i in b) for b in batches]
    assert len(set(counts)) > 1, "variable lengths give variable sample counts"
    # over 20 epochs, the replay share of tokens is close to 20% (the crossing sample is kept with the probability
    # of the part of it the target covers)
    for epoch in range(1, 20):
        sampler.set_epoch(epoch)
        batches += list(sampler)
    assert 0.18 < token_share(sampler, batches) < 0.22


@pytest.mark.parametrize("batch_size", [1, 2])
def test_small_batches_keep_their_token_share(batch_size):
    """Issue 12: a batch of 1 at 10% rehearsed a whole pool sample every batch (about half the tokens); the crossing
    sample is now kept with the probability of the part of it the target covers."""
    sampler = make(batch_size=batch_size, replay_ratio=0.1, strategy="random")
    batches = []
    for epoch in range(10):
        sampler.set_epoch(epoch)
        batches += list(sampler)
    check_budgets(sampler, batches, 0.1)
    assert 0.085 < token_share(sampler, batches) < 0.115, token_share(sampler, batches)


def test_ranks_draw_their_own_budgets_with_identical_state():
    samplers = [make(rank=r, world_size=2, num_finetune=N + 1, finetune_lengths=lengths(N + 1, 2)) for r in range(2)]
    epochs = [list(s) for s in samplers]
    assert len(epochs[0]) == len(epochs[1]) == 6  # 61 samples padded to 62: 31 per rank
    for sampler, batches in zip(samplers, epochs, strict=True):
        check_budgets(sampler, batches, 0.2, n=N + 1)
    states = [s.state_dict() for s in samplers]
    assert all(torch.equal(states[0]["policy"][k], states[1]["policy"][k]) for k in ("alpha", "seen", "forgot"))
    assert states[0]["position"] == states[1]["position"]
    replay = [[i for b in batches for i in b if i > N] for batches in epochs]
    assert replay[0] != replay[1], "the ranks rehearse different samples"


def test_loss_priority_draws_runs_of_the_cycle_that_never_overlap():
    sampler = make(strategy="loss_priority")
    priority = sampler.policy._priority.tolist()
    seen: list[int] = []
    for batch in sampler:
        drawn = [i - N for i in batch if i >= N]
        if drawn:
            start = priority.index(drawn[0])
            assert drawn == [priority[(start + k) % M] for k in range(len(drawn))], "a contiguous run of the cycle"
            assert not set(drawn) & set(seen), "batches take disjoint runs"
            seen += drawn
    assert len(seen) < M


def test_schedule_and_resume_in_token_mode():
    sampler = make(replay_schedule=[(0.0, 0.5), (1.0, 0.1)], schedule_batches=20)
    first = list(sampler)
    check_budgets(sampler, first[:1], 0.5)
    sampler.set_epoch(1)
    state = sampler.state_dict()
    second = list(sampler)
    restored = make(replay_schedule=[(0.0, 0.5), (1.0, 0.1)], schedule_batches=20)
    restored.load_state_dict(state)
    assert list(restored) == second


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pool_lengths": None}, "pool_lengths"),
        ({"finetune_lengths": None}, "finetune_lengths"),
        ({"pool_lengths": torch.ones(M - 1, dtype=torch.long)}, "pool_lengths"),
        ({"finetune_lengths": torch.zeros(N, dtype=torch.long)}, "finetune_lengths"),
        ({"pool_lengths": torch.ones(M)}, "integer"),
        ({"replay_per_step": 2}, "replay_ratio"),
        ({"budget": "flops"}, "budget"),
    ],
)
def test_token_budget_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_num_tokens():
    assert num_tokens({"input_ids": torch.arange(5), "attention_mask": torch.tensor([1, 1, 1, 0, 0])}) == 3
    assert num_tokens({"input_ids": [1, 2, 3, 4]}) == 4
    assert num_tokens((torch.arange(7), 1)) == 7
    assert num_tokens(torch.zeros(2, 3)) == 6
    with pytest.raises(ValueError, match="cannot count the tokens"):
        num_tokens({"pixel_values": torch.zeros(3)})


def test_token_level_statistics_need_one_sequence_length():
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    loader = DataLoader(
        WithSampleIds(variable_length_chunks("pretrain", 8, seed=1)), batch_size=3, collate_fn=pad_collate
    )
    with pytest.raises(ValueError, match="same sequence length"):
        ReferenceStatistics.compute(module, loader, task="causal_lm", store_token_nll=True)  # type: ignore[arg-type]


@pytest.mark.slow
def test_datamodule_token_budget_with_an_lm():
    torch.manual_seed(0)
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    module.correct_threshold = 0.0
    data = token_budget_datamodule(module)
    outputs = Outputs()
    cpu_trainer(2, [RehearsalFeedback(), outputs], use_distributed_sampler=False).fit(module, data)
    assert data.sampler is not None and data.sampler.budget == "tokens"
    assert int(data.sampler.seen.sum()) == sum(int((b["sample_id"] >= 24).sum()) for _, b in outputs.steps)
    for _, batch in outputs.steps:
        replay = batch["sample_id"] >= 24
        tokens = batch["attention_mask"].sum(1)
        target = int(tokens[~replay].sum()) * 0.25 / 0.75
        assert not replay.any() or int(tokens[replay].sum()) - int(tokens[replay][-1]) < target


def test_no_feedback_warning_when_a_tiny_token_share_draws_nothing():
    """Issue 12: under budget="tokens" a tiny share draws no pool sample in an epoch; RehearsalFeedback warned that
    training_step reported no pool ids (it counted the batches with a share > 0, not those that drew samples)."""
    torch.manual_seed(0)
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    module.correct_threshold = 0.0
    data = token_budget_datamodule(module, replay_ratio=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(1, [RehearsalFeedback()], use_distributed_sampler=False).fit(module, data)
    assert data.sampler is not None and int(data.sampler.seen.sum()) == 0, "nothing rehearsed"
    assert not [w for w in caught if "no pool sample id" in str(w.message)]


@pytest.mark.slow
def test_ddp_token_budget_ranks_agree(tmp_path):
    r0, r1 = run_ddp_script("ddp_rehearsal_tokens.py", tmp_path)
    assert r0["param_max_diff"] == 0.0 and r1["param_max_diff"] == 0.0
    assert r0["state"] == r1["state"] and r0["global_step"] == r1["global_step"] > 0
    assert r0["replay_counts"] != r1["replay_counts"], "the ranks rehearse different numbers of samples"
    # every rank's sampler saw every rank's rehearsed samples (the padded all-gather)
    assert r0["seen"] == sum(r0["replay_counts"]) + sum(r1["replay_counts"])
    assert 0 < r0["forgot"] < r0["seen"], (
        "mixed flags: a misaligned gather of ids and flags would split the ranks' rates"
    )
    # the pool statistics pass was sharded: each rank forwarded its half of the 40 pool chunks, and the gathered
    # statistics are the same on both ranks and equal to a 1-process pass over the whole pool
    assert r0["statistics_rows"] == r1["statistics_rows"] == 20
    script = load_script("ddp_rehearsal_tokens")
    pool = WithSampleIds(script.pool())
    single = ReferenceStatistics.compute(
        script.start_module(),
        DataLoader(pool, batch_size=8, collate_fn=pad_collate),
        "causal_lm",
        lm_correct_threshold=0.0,
    )
    for key in ("pool_ids", "pool_loss", "pool_correct"):
        assert r0[key] == r1[key], f"ranks differ on {key}"
    assert r0["pool_ids"] == single.sample_ids.tolist() == list(range(40))
    assert r0["pool_correct"] == single.correct.tolist()
    torch.testing.assert_close(torch.tensor(r0["pool_loss"]), single.loss, rtol=1e-5, atol=1e-6)
