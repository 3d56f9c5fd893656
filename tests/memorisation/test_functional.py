"""Tests of the pure tensor functions in ``lightning_ft.memorisation.functional`` (method card §2, §5, §6, §8)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ft.memorisation import NGramRegularizer
from lightning_ft.memorisation.functional import (
    exact_match,
    goldfish_mask,
    matching_prefix_length,
    ngram_memorisation_score,
    ngram_regularizer,
    token_accuracy,
    token_logprobs,
)

# --------------------------------------------------------------------------------------------------------------------
# naive pure-Python references
# --------------------------------------------------------------------------------------------------------------------


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def naive_bag_fraction(generated: list[int], reference: list[int], n: int) -> float:
    """|G_n(gen) ∩ G_n(ref)|_clipped / |G_n(ref)| with collections.Counter (n clipped to the length)."""
    n = min(n, len(reference))
    gen_counts = Counter(_ngrams(generated, n))
    ref_counts = Counter(_ngrams(reference, n))
    clipped = sum(min(count, gen_counts[gram]) for gram, count in ref_counts.items())
    return clipped / max(1, sum(ref_counts.values()))


def naive_positional_fraction(generated: list[int], reference: list[int], n: int) -> float:
    n = min(n, len(reference))
    windows = len(reference) - n + 1
    hits = sum(generated[i : i + n] == reference[i : i + n] for i in range(windows))
    return hits / windows


def naive_score(generated: list[int], reference: list[int], sizes: list[int], match: str) -> float:
    fraction = naive_bag_fraction if match == "bag" else naive_positional_fraction
    distinct = sorted(set(sizes))
    return sum(fraction(generated, reference, n) for n in distinct) / len(distinct)


def naive_matching_prefix(generated: list[int], reference: list[int]) -> int:
    length = 0
    for g, r in zip(generated, reference, strict=True):
        if g != r:
            break
        length += 1
    return length


def naive_regularizer(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    sizes: tuple[int, ...],
    gamma: float,
    delta: float,
) -> float:
    """Double loop over windows and n: mean over valid (t, n) of gate * relu((L - L0) / n - delta)."""
    total, count = 0.0, 0
    batch, length = logprobs.shape
    for b in range(batch):
        for n in sorted(set(sizes)):
            for t in range(n - 1, length):
                window = range(t - n + 1, t + 1)
                if not all(bool(mask[b, j]) for j in window):
                    continue  # the window touches an unsupervised position
                count += 1
                cur = sum(float(logprobs[b, j]) for j in window)
                ref = sum(float(ref_logprobs[b, j]) for j in window)
                if math.exp(cur / n) > gamma:
                    total += max(0.0, (cur - ref) / n - delta)
    return total / max(count, 1)


def naive_goldfish(labels: torch.Tensor, k: int, h: int, ignore_index: int = -100) -> torch.Tensor:
    """The official ``apply_goldfish`` hash-table strategy, one position at a time (ahans30/goldfish-loss)."""
    table = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2971215073))
    out = labels.clone()
    for b in range(labels.shape[0]):
        for t in range(h - 1, labels.shape[1]):
            key = int(torch.remainder(labels[b, t - h + 1 : t + 1].prod(), 1_000_003))
            if table[key] < 1 / k:
                out[b, t] = ignore_index
    return out


# --------------------------------------------------------------------------------------------------------------------
# n-gram memorisation score
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("match", ["bag", "positional"])
@pytest.mark.parametrize("n", [1, 4, (4, 5, 6), (2, 3)])
def test_ngram_score_is_one_on_identical_sequences(match: str, n: int | tuple[int, ...]) -> None:
    ref = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ngram_memorisation_score(ref, ref.clone(), n, match), torch.ones(3))


@pytest.mark.parametrize("match", ["bag", "positional"])
@pytest.mark.parametrize("n", [1, 4, (4, 5, 6)])
def test_ngram_score_is_zero_on_disjoint_sequences(match: str, n: int | tuple[int, ...]) -> None:
    ref = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    gen = torch.randint(50, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ngram_memorisation_score(gen, ref, n, match), torch.zeros(3))


def test_ngram_score_docstring_examples() -> None:
    s = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    assert ngram_memorisation_score(s, s).item() == 1.0
    assert ngram_memorisation_score(s.flip(0), s).item() == 0.0


def test_bag_stays_high_and_positional_drops_on_block_shuffled_sequence() -> None:
    # distinct tokens; swapping the two halves keeps all but one 4-gram per half boundary.
    ref = torch.arange(100, 132)
    gen = torch.cat([ref[16:], ref[:16]])
    bag = ngram_memorisation_score(gen, ref, n=4, match="bag").item()
    positional = ngram_memorisation_score(gen, ref, n=4, match="positional").item()
    assert bag == pytest.approx(26 / 29)  # 29 reference 4-grams, the 3 crossing the half boundary are lost
    assert positional == 0.0
    assert bag > 0.8 > positional


def test_bag_stays_high_and_positional_is_zero_on_a_shifted_copy() -> None:
    ref = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    gen = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).roll(1)  # 10, 1, 2, ..., 9
    assert ngram_memorisation_score(gen, ref, n=2, match="bag").item() == pytest.approx(8 / 9)
    assert ngram_memorisation_score(gen, ref, n=2, match="positional").item() == 0.0


def test_bag_clips_repeated_ngrams() -> None:
    # the generation repeats the reference's 2-gram (1, 2) three times; the reference has it once: clipped to 1.
    ref = torch.tensor([1, 2, 3, 4])
    gen = torch.tensor([1, 2, 1, 2])
    assert ngram_memorisation_score(gen, ref, n=2).item() == pytest.approx(1 / 3)
    # repeated n-grams in the reference count as often as they occur
    ref = torch.tensor([7, 7, 7, 7])
    assert ngram_memorisation_score(torch.tensor([7, 7, 1, 1]), ref, n=2).item() == pytest.approx(1 / 3)
    assert ngram_memorisation_score(torch.tensor([7, 7, 7, 1]), ref, n=2).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("match", ["bag", "positional"])
@pytest.mark.parametrize("length", [1, 2, 3])
def test_sequences_shorter_than_n_score_their_exact_match_indicator(match: str, length: int) -> None:
    ref = torch.arange(1, length + 1).unsqueeze(0).repeat(3, 1)
    gen = ref.clone()
    gen[1, -1] = 99  # differs in the last token
    gen[2] = gen[2].flip(0) if length > 1 else torch.tensor([42])  # permuted (bag cannot rescue it: n clipped to len)
    scores = ngram_memorisation_score(gen, ref, n=(4, 5, 6), match=match)
    assert scores.tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(scores, exact_match(gen, ref))


@pytest.mark.parametrize("match", ["bag", "positional"])
def test_batched_score_equals_row_by_row(match: str) -> None:
    gen_ = torch.Generator().manual_seed(3)
    ref = torch.randint(0, 4, (7, 12), generator=gen_)
    gen = torch.where(torch.rand(7, 12, generator=gen_) < 0.3, torch.randint(0, 4, (7, 12), generator=gen_), ref)
    batched = ngram_memorisation_score(gen, ref, (1, 2, 4), match)
    assert batched.shape == (7,)
    single = [ngram_memorisation_score(gen[i], ref[i], (1, 2, 4), match) for i in range(7)]
    assert all(s.dim() == 0 for s in single)
    torch.testing.assert_close(batched, torch.stack(single))


def test_ngram_score_is_float_and_independent_of_integer_dtype() -> None:
    ref = torch.randint(0, 5, (4, 10), generator=torch.Generator().manual_seed(5))
    gen = ref.roll(1, dims=1)
    expected = ngram_memorisation_score(gen, ref, (1, 3))
    assert expected.dtype == torch.float32
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(ngram_memorisation_score(gen.to(dtype), ref.to(dtype), (1, 3)), expected)


def test_duplicate_ngram_sizes_are_counted_once() -> None:
    ref = torch.tensor([1, 2, 3, 4, 5, 6])
    gen = torch.tensor([1, 2, 3, 9, 5, 6])
    torch.testing.assert_close(
        ngram_memorisation_score(gen, ref, (2, 2, 3)), ngram_memorisation_score(gen, ref, (3, 2))
    )


_tokens = st.integers(min_value=1, max_value=5)


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    length = draw(st.integers(min_value=1, max_value=12))
    generated = draw(st.lists(_tokens, min_size=length, max_size=length))
    reference = draw(st.lists(_tokens, min_size=length, max_size=length))
    sizes = draw(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4))
    return generated, reference, sizes


@settings(max_examples=150, deadline=None)
@given(data=_pairs(), match=st.sampled_from(["bag", "positional"]))
def test_ngram_score_equals_naive_counter_implementation(
    data: tuple[list[int], list[int], list[int]], match: str
) -> None:
    generated, reference, sizes = data
    score = ngram_memorisation_score(torch.tensor(generated), torch.tensor(reference), sizes, match)
    assert score.item() == pytest.approx(naive_score(generated, reference, sizes, match), abs=1e-6)
    assert 0.0 <= score.item() <= 1.0
    self_score = ngram_memorisation_score(torch.tensor(reference), torch.tensor(reference), sizes, match)
    assert self_score.item() == pytest.approx(1.0, abs=1e-6)
    if match == "positional":  # positional matching is stricter than the bag
        bag = ngram_memorisation_score(torch.tensor(generated), torch.tensor(reference), sizes, "bag")
        assert score.item() <= bag.item() + 1e-6


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(_tokens, min_size=9, max_size=9), min_size=2, max_size=6),
    match=st.sampled_from(["bag", "positional"]),
)
def test_batched_ngram_score_equals_naive_per_row(rows: list[list[int]], match: str) -> None:
    ref = torch.tensor(rows)
    gen = ref.flip(0)  # pair each row with another row
    scores = ngram_memorisation_score(gen, ref, (2, 4), match)
    expected = [naive_score(g, r, [2, 4], match) for g, r in zip(gen.tolist(), rows, strict=True)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# exact match, token accuracy, matching prefix
# --------------------------------------------------------------------------------------------------------------------


def test_token_accuracy_equals_pythia_formula() -> None:
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, 100, (16, 64), generator=g)
    generations = data.clone()
    corrupt = torch.rand(16, 64, generator=g) < torch.linspace(0, 1, 16).unsqueeze(1)
    generations[corrupt] = (generations[corrupt] + 1) % 100
    true_continuation = data[:, 32:64]
    pythia = (true_continuation == generations[:, 32:64]).float().mean(-1)
    torch.testing.assert_close(token_accuracy(generations[:, 32:64], true_continuation), pythia, rtol=0, atol=0)
    assert token_accuracy(generations[0, 32:64], true_continuation[0]).item() == pythia[0].item()


def test_exact_match_is_one_only_when_every_token_matches() -> None:
    ref = torch.arange(10, 42).repeat(5, 1)
    gen = ref.clone()
    gen[1, 0] += 1  # first token wrong
    gen[2, -1] += 1  # last token wrong
    gen[3, 16] += 1  # one token wrong in the middle
    gen[4] = ref[4].flip(0)  # same multiset, different order
    assert exact_match(gen, ref).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert exact_match(gen[0], ref[0]).item() == 1.0
    assert exact_match(gen[0], ref[0]).dim() == 0
    assert token_accuracy(gen, ref)[:4].tolist() == [1.0, 31 / 32, 31 / 32, 31 / 32]


_row8 = st.lists(st.integers(0, 2), min_size=8, max_size=8)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(_row8, _row8), min_size=1, max_size=5))
def test_matching_prefix_length_equals_naive_loop(rows: list[tuple[list[int], list[int]]]) -> None:
    gen = torch.tensor([r[0] for r in rows])
    ref = torch.tensor([r[1] for r in rows])
    out = matching_prefix_length(gen, ref)
    assert out.dtype == torch.int64
    assert out.tolist() == [naive_matching_prefix(g, r) for g, r in rows]
    # a full-length matching prefix is exactly an exact match
    assert ((out == ref.shape[1]).float() == exact_match(gen, ref)).all()


def test_matching_prefix_length_single_row() -> None:
    out = matching_prefix_length(torch.tensor([1, 2, 3, 9, 5]), torch.tensor([1, 2, 3, 4, 5]))
    assert out.dim() == 0 and out.item() == 3


# --------------------------------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------------------------------

_REF = torch.tensor([[1, 2, 3, 4, 5]])


@pytest.mark.parametrize("n", [(), [], (0,), 0, (2, -1), -3, (2.0,), True, (True,)])
def test_invalid_ngram_sizes_raise_value_error_naming_n(n: object) -> None:
    with pytest.raises(ValueError, match="`n`"):
        ngram_memorisation_score(_REF, _REF, n=n)  # type: ignore[arg-type]


def test_invalid_match_raises_value_error() -> None:
    with pytest.raises(ValueError, match="match"):
        ngram_memorisation_score(_REF, _REF, match="foo")  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", [ngram_memorisation_score, exact_match, token_accuracy, matching_prefix_length])
def test_shape_mismatch_raises_value_error(fn) -> None:
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("fn", [ngram_memorisation_score, exact_match, token_accuracy, matching_prefix_length])
def test_float_inputs_raise_type_error(fn) -> None:
    with pytest.raises(TypeError, match="integer"):
        fn(_REF.float(), _REF)
    with pytest.raises(TypeError, match="integer"):
        fn(_REF, _REF.double())


@pytest.mark.parametrize("fn", [ngram_memorisation_score, exact_match, token_accuracy, matching_prefix_length])
def test_non_tensor_and_3d_inputs_are_rejected(fn) -> None:
    with pytest.raises(TypeError):
        fn([1, 2, 3], torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.ones(2, 2, 2, dtype=torch.long), torch.ones(2, 2, 2, dtype=torch.long))


def test_empty_reference_raises_value_error() -> None:
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="length 0"):
        ngram_memorisation_score(empty, empty)


# --------------------------------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------------------------------


def test_token_logprobs_shifts_labels_like_manual_log_softmax_gather() -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 9, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (3, 9), generator=g)
    labels[0, :4] = -100  # prompt
    labels[2, 6:] = -100  # right padding
    logprobs, mask = token_logprobs(logits, labels)
    assert logprobs.shape == mask.shape == (3, 8)
    torch.testing.assert_close(mask, labels[:, 1:] != -100)
    manual = torch.zeros(3, 8, dtype=torch.float64)
    for b in range(3):
        for t in range(8):
            target = int(labels[b, t + 1])
            if target != -100:
                manual[b, t] = torch.log_softmax(logits[b, t], -1)[target]
    torch.testing.assert_close(logprobs.double(), manual, rtol=1e-6, atol=1e-6)
    assert (logprobs[~mask] == 0).all()


def test_token_logprobs_custom_ignore_index_and_shape_check() -> None:
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 7, 2, 3]])
    _, mask = token_logprobs(logits, labels.clamp_max(4), ignore_index=7)
    assert mask.tolist() == [[True, True, True]]
    _, mask = token_logprobs(torch.randn(1, 4, 8), labels, ignore_index=7)
    assert mask.tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(torch.randn(1, 4, 5), torch.tensor([[1, 2, 3]]))


# --------------------------------------------------------------------------------------------------------------------
# n-gram regulariser
# --------------------------------------------------------------------------------------------------------------------


def _labels_with_gaps(batch: int, length: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Labels with a prompt (-100), -100 gaps inside the response and right padding (-100)."""
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    for b in range(batch):
        labels[b, : int(torch.randint(0, 4, (1,), generator=g))] = -100
        gap = int(torch.randint(4, length - 2, (1,), generator=g))
        labels[b, gap : gap + int(torch.randint(1, 3, (1,), generator=g))] = -100
        labels[b, length - int(torch.randint(0, 3, (1,), generator=g)) :] = -100
    return labels


def _logprob_pair(seed: int, batch: int = 3, length: int = 16, vocab: int = 4):
    g = torch.Generator().manual_seed(seed)
    labels = _labels_with_gaps(batch, length, vocab, g)
    # peaked logits so that some windows pass the confidence gate
    logits = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    ref_logits = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    logprobs, mask = token_logprobs(logits, labels)
    ref_logprobs, ref_mask = token_logprobs(ref_logits, labels)
    assert torch.equal(mask, ref_mask)
    return logprobs.double(), ref_logprobs.double(), mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("sizes", "gamma", "delta"), [((4,), 0.0, 0.0), ((1, 2, 3), 0.3, 0.0), ((2, 5), 0.1, 0.2), ((1,), 0.6, 0.05)]
)
def test_regularizer_cumsum_windows_equal_naive_double_loop(
    seed: int, sizes: tuple[int, ...], gamma: float, delta: float
) -> None:
    logprobs, ref_logprobs, mask = _logprob_pair(seed)
    assert not mask.all() and mask.any()
    expected = naive_regularizer(logprobs, ref_logprobs, mask, sizes, gamma, delta)
    got = ngram_regularizer(logprobs, ref_logprobs, mask, sizes, gamma, delta)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_regularizer_excludes_windows_crossing_unsupervised_positions() -> None:
    # a huge excess at every position, but position 2 is unsupervised: with n=3 no window is fully supervised.
    logprobs = torch.full((1, 5), -0.01)
    ref_logprobs = torch.full((1, 5), -10.0)
    mask = torch.tensor([[True, True, False, True, True]])
    assert ngram_regularizer(logprobs, ref_logprobs, mask, (3,), gamma=0.0).item() == 0.0
    # n=2: only windows (0, 1) and (3, 4) are valid, each with excess 9.99
    assert ngram_regularizer(logprobs, ref_logprobs, mask, (2,), gamma=0.0).item() == pytest.approx(9.99)
    # the masked value itself is ignored even if it is garbage
    logprobs[0, 2] = float("-inf")
    assert ngram_regularizer(logprobs, ref_logprobs, mask, (2,), gamma=0.0).item() == pytest.approx(9.99)


def test_regularizer_longer_windows_than_sequence_are_skipped() -> None:
    logprobs, ref_logprobs = torch.full((2, 3), -0.1), torch.full((2, 3), -1.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert ngram_regularizer(logprobs, ref_logprobs, mask, (8,), gamma=0.0).item() == 0.0
    assert ngram_regularizer(logprobs, ref_logprobs, mask, (2, 8), gamma=0.0).item() == pytest.approx(0.9)


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("delta", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_regularizer_is_zero_when_model_equals_reference(variant: str, delta: float, gamma: float) -> None:
    logprobs, _, mask = _logprob_pair(0)
    out = ngram_regularizer(logprobs, logprobs.clone(), mask, (1, 2, 4), gamma, delta, variant)  # type: ignore[arg-type]
    assert out.item() == 0.0
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 10, 13, generator=g)
    labels = _labels_with_gaps(2, 10, 13, g)
    reg = NGramRegularizer(ngram_sizes=(1, 3), gamma=gamma, delta=delta, weight=1.0, variant=variant)  # type: ignore[arg-type]
    assert reg(logits, labels, ref_logits=logits.clone()).item() == 0.0


def test_regularizer_gradient_flows_into_logprobs_but_never_into_reference() -> None:
    logprobs, ref_logprobs, mask = _logprob_pair(2)
    current = logprobs.clone().requires_grad_(True)
    reference = (ref_logprobs - 1.0).clone().requires_grad_(True)
    out = ngram_regularizer(current, reference, mask, (1, 2), gamma=0.0)
    assert out.item() > 0
    out.backward()
    assert current.grad is not None and current.grad.abs().sum() > 0
    assert reference.grad is None
    assert (current.grad[~mask] == 0).all()  # unsupervised positions get no gradient


def test_regularizer_module_gradient_reaches_logits_not_ref_logits() -> None:
    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(2, 12, 5, generator=g)).requires_grad_(True)
    ref_logits = torch.randn(2, 12, 5, generator=g).requires_grad_(True)
    labels = logits.detach().argmax(-1).roll(1, dims=1)  # labels[t + 1] = argmax logits[t]: confident model
    labels[:, 0] = -100
    reg = NGramRegularizer(ngram_sizes=(2,), gamma=0.0, weight=0.5)
    out = reg(logits, labels, ref_logits=ref_logits)
    assert out.item() > 0
    out.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert ref_logits.grad is None
    # cached per-token reference log-probs give the same value and also receive no gradient
    ref_logprobs, _ = token_logprobs(ref_logits.detach(), labels)
    ref_logprobs.requires_grad_(True)
    cached = reg(logits, labels, ref_logprobs=ref_logprobs)
    assert cached.item() == pytest.approx(out.item())
    cached.backward()
    assert ref_logprobs.grad is None


def test_regularizer_module_weight_scales_the_penalty() -> None:
    logprobs, ref_logprobs, mask = _logprob_pair(3)
    plain = ngram_regularizer(logprobs, ref_logprobs, mask, (2,), gamma=0.1)
    reg = NGramRegularizer(ngram_sizes=(2,), gamma=0.1, weight=3.0)
    assert reg.penalty(logprobs, ref_logprobs, mask).item() == pytest.approx(plain.item())
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(2, 8, 6, generator=g), torch.randn(2, 8, 6, generator=g)
    labels = torch.randint(0, 6, (2, 8), generator=g)
    one = NGramRegularizer(ngram_sizes=(2,), gamma=0.0, weight=1.0)(logits, labels, ref_logits=ref_logits)
    three = NGramRegularizer(ngram_sizes=(2,), gamma=0.0, weight=3.0)(logits, labels, ref_logits=ref_logits)
    assert three.item() == pytest.approx(3 * one.item())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("gamma", "delta"), [(0.0, 0.0), (0.4, 0.1)])
def test_regularizer_variant_b_equals_variant_a_with_unigrams(seed: int, gamma: float, delta: float) -> None:
    logprobs, ref_logprobs, mask = _logprob_pair(seed)
    b = ngram_regularizer(logprobs, ref_logprobs, mask, (4, 5), gamma, delta, variant="B")
    a = ngram_regularizer(logprobs, ref_logprobs, mask, (1,), gamma, delta, variant="A")
    assert b.item() == pytest.approx(a.item(), rel=1e-12, abs=0)
    assert b.item() == pytest.approx(naive_regularizer(logprobs, ref_logprobs, mask, (1,), gamma, delta))


def test_regularizer_gate_closes_on_low_confidence_inputs() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 20, 50, generator=g)  # nearly flat over 50 tokens: p ~ 0.02
    labels = torch.randint(0, 50, (4, 20), generator=g)
    logprobs, mask = token_logprobs(logits, labels)
    far_worse_reference = logprobs - 5.0
    assert ngram_regularizer(logprobs, far_worse_reference, mask, (1, 2), gamma=0.99).item() == 0.0
    assert ngram_regularizer(logprobs, far_worse_reference, mask, (1, 2), gamma=0.0).item() == pytest.approx(5.0)
    reg = NGramRegularizer(ngram_sizes=(1, 2), gamma=0.99, weight=1.0)
    assert reg(logits, labels, ref_logits=torch.zeros_like(logits)).item() == 0.0


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5])
def test_regularizer_rejects_bad_gamma(gamma: float) -> None:
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="gamma"):
        ngram_regularizer(x, x, torch.ones(1, 4, dtype=torch.bool), gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        NGramRegularizer(gamma=gamma)


@pytest.mark.parametrize("variant", ["C", "a", ""])
def test_regularizer_rejects_bad_variant(variant: str) -> None:
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="variant"):
        ngram_regularizer(x, x, torch.ones(1, 4, dtype=torch.bool), variant=variant)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant"):
        NGramRegularizer(variant=variant)  # type: ignore[arg-type]


def test_regularizer_rejects_bad_sizes_shapes_and_weight() -> None:
    x, mask = torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="ngram_sizes"):
        ngram_regularizer(x, x, mask, ngram_sizes=())
    with pytest.raises(ValueError, match="ngram_sizes"):
        NGramRegularizer(ngram_sizes=(0,))
    with pytest.raises(ValueError, match="same"):
        ngram_regularizer(x, torch.zeros(1, 5), mask)
    with pytest.raises(ValueError, match="weight"):
        NGramRegularizer(weight=-1.0)
    reg = NGramRegularizer()
    logits, labels = torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        reg(logits, labels)
    with pytest.raises(ValueError, match="exactly one"):
        reg(logits, labels, ref_logits=logits, ref_logprobs=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ref_logprobs"):
        reg(logits, labels, ref_logprobs=torch.zeros(1, 4))


# --------------------------------------------------------------------------------------------------------------------
# Goldfish
# --------------------------------------------------------------------------------------------------------------------


def test_goldfish_same_input_gives_same_mask_and_same_text_same_drops() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50_000, (2, 300), generator=g)
    first, second = goldfish_mask(labels, k=4, h=4), goldfish_mask(labels.clone(), k=4, h=4)
    assert torch.equal(first, second)
    assert torch.equal(labels, labels.clone())  # input not modified
    # the same text at another offset is dropped at the same places (the mask depends on the window contents only)
    shifted = torch.cat([torch.randint(0, 50_000, (2, 37), generator=g), labels], 1)
    assert torch.equal(goldfish_mask(shifted, k=4, h=4)[:, 37 + 3 :], first[:, 3:])


def test_goldfish_matches_official_hash_table_reference() -> None:
    labels = torch.randint(0, 50_000, (3, 80), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(goldfish_mask(labels, k=4, h=4), naive_goldfish(labels, k=4, h=4), rtol=0, atol=0)
    torch.testing.assert_close(goldfish_mask(labels, k=3, h=13), naive_goldfish(labels, k=3, h=13), rtol=0, atol=0)


@pytest.mark.parametrize("k", [3, 4, 8])
def test_goldfish_drop_fraction_is_about_one_over_k(k: int) -> None:
    h = 4
    labels = torch.randint(0, 50_000, (4, 5_000), generator=torch.Generator().manual_seed(k))
    dropped = goldfish_mask(labels, k=k, h=h) == -100
    fraction = dropped[:, h - 1 :].float().mean().item()
    assert abs(fraction - 1 / k) < 0.05, fraction
    assert dropped.sum() > 0


@pytest.mark.parametrize("h", [1, 4, 13])
def test_goldfish_never_drops_positions_before_h_minus_1(h: int) -> None:
    labels = torch.randint(1, 1_000, (64, 40), generator=torch.Generator().manual_seed(h))
    dropped = goldfish_mask(labels, k=2, h=h) == -100
    assert not dropped[:, : h - 1].any()
    assert dropped[:, h - 1 :].any()
    # sequences shorter than h: nothing is dropped
    short = labels[:, : max(h - 1, 0)]
    if short.shape[1]:
        assert torch.equal(goldfish_mask(short, k=2, h=h), short)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_goldfish_static_drops_every_kth_token(k: int) -> None:
    labels = torch.arange(1, 25).repeat(2, 1)
    out = goldfish_mask(labels, k=k, strategy="static", ignore_index=-1)
    dropped = (out == -1).nonzero()[:, 1].unique().tolist()
    assert dropped == list(range(k - 1, 24, k))
    assert torch.equal(out[out != -1], labels[out != -1])


def test_goldfish_writes_custom_ignore_index() -> None:
    labels = torch.randint(0, 50_000, (1, 400), generator=torch.Generator().manual_seed(2))
    default = goldfish_mask(labels, k=4, h=4)
    custom = goldfish_mask(labels, k=4, h=4, ignore_index=-7)
    assert torch.equal(default == -100, custom == -7)


@pytest.mark.parametrize("k", [1, 0, -4, True, 2.0, None])
def test_goldfish_rejects_invalid_k(k: object) -> None:
    with pytest.raises(ValueError, match="`k`"):
        goldfish_mask(torch.ones(1, 8, dtype=torch.long), k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize("h", [0, -1, True, 4.0])
def test_goldfish_rejects_invalid_h(h: object) -> None:
    with pytest.raises(ValueError, match="`h`"):
        goldfish_mask(torch.ones(1, 8, dtype=torch.long), k=4, h=h)  # type: ignore[arg-type]


def test_goldfish_rejects_bad_strategy_and_labels() -> None:
    with pytest.raises(ValueError, match="strategy"):
        goldfish_mask(torch.ones(1, 8, dtype=torch.long), strategy="seeded_random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        goldfish_mask(torch.ones(1, 8))
    with pytest.raises(ValueError, match="labels"):
        goldfish_mask(torch.ones(8, dtype=torch.long))
