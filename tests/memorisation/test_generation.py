"""Tests of batched greedy decoding (``greedy_continuations``) against Hugging Face ``generate`` (method card §2.3)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM

from lightning_ft.memorisation.functional import exact_match, matching_prefix_length, token_accuracy
from lightning_ft.memorisation.generation import greedy_continuations, left_pad

VOCAB = 300
SUFFIX_LEN = 8
# different lengths, including a 1-token prefix and two prefixes of the maximum length
PREFIX_LENGTHS = [3, 7, 5, 9, 1, 9, 4]


def _gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models: one intra-op thread avoids thread contention on a busy 2-core machine (20-50x faster there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_reference(model: nn.Module, prefixes: list[torch.Tensor], suffix_len: int) -> torch.Tensor:
    """Unbatched Hugging Face greedy decoding, one prefix at a time (no padding involved)."""
    model.eval()  # models built from a config start in train mode: dropout would make generate random
    rows = []
    with torch.no_grad():
        for p in prefixes:
            out = model.generate(
                p[None],
                max_new_tokens=suffix_len,
                do_sample=False,
                attention_mask=torch.ones_like(p[None]),
                pad_token_id=0,
            )
            assert out.shape == (1, p.numel() + suffix_len)
            rows.append(out[0, p.numel() :])
    return torch.stack(rows)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_and_reference(request: pytest.FixtureRequest):
    """A float64 tiny model, prefixes of different and of equal lengths, and the per-sample HF reference for both."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]().double().eval()
    g = torch.Generator().manual_seed(1)
    ragged = [torch.randint(1, VOCAB, (n,), generator=g) for n in PREFIX_LENGTHS]
    equal = torch.randint(1, VOCAB, (5, 6), generator=g)
    references = {
        "ragged": _hf_reference(model, ragged, SUFFIX_LEN),
        "equal": _hf_reference(model, list(equal), SUFFIX_LEN),
    }
    # the random init is not flat: generations differ between rows and are not a single repeated token
    assert references["ragged"].unique().numel() > SUFFIX_LEN
    return request.param, model, {"ragged": ragged, "equal": equal}, references


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("lengths", ["ragged", "equal"])
def test_batched_greedy_equals_unbatched_hf_generate(model_and_reference, lengths: str, batch_size: int) -> None:
    _, model, prefixes, references = model_and_reference
    out = greedy_continuations(model, prefixes[lengths], SUFFIX_LEN, batch_size=batch_size)
    assert out.dtype == torch.int64
    assert out.shape == references[lengths].shape
    torch.testing.assert_close(out, references[lengths], rtol=0, atol=0)


def test_equal_length_list_and_tensor_prefixes_agree(model_and_reference) -> None:
    _, model, prefixes, references = model_and_reference
    from_list = greedy_continuations(model, list(prefixes["equal"]), SUFFIX_LEN, batch_size=2)
    torch.testing.assert_close(from_list, references["equal"], rtol=0, atol=0)


def test_pad_token_id_does_not_change_the_result(model_and_reference) -> None:
    _, model, prefixes, references = model_and_reference
    for pad in (0, 17, VOCAB - 1):
        out = greedy_continuations(model, prefixes["ragged"], SUFFIX_LEN, batch_size=4, pad_token_id=pad)
        torch.testing.assert_close(out, references["ragged"], rtol=0, atol=0)


def test_uncached_wrapper_equals_cached_path(model_and_reference) -> None:
    _, model, prefixes, references = model_and_reference

    class LogitsOnly(nn.Module):  # a plain module: no config, no get_output_embeddings, returns a tensor
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids).logits

    wrapped = LogitsOnly(model)
    out = greedy_continuations(wrapped, prefixes["equal"], SUFFIX_LEN, batch_size=2, use_cache=False)
    torch.testing.assert_close(out, references["equal"], rtol=0, atol=0)
    default = greedy_continuations(wrapped, prefixes["equal"], SUFFIX_LEN)  # use_cache defaults to False here
    torch.testing.assert_close(default, references["equal"], rtol=0, atol=0)
    cached = greedy_continuations(model, prefixes["equal"], SUFFIX_LEN, use_cache=True)
    uncached_hf = greedy_continuations(model, prefixes["equal"], SUFFIX_LEN, use_cache=False)
    torch.testing.assert_close(cached, uncached_hf, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different lengths"):
        greedy_continuations(wrapped, prefixes["ragged"], SUFFIX_LEN, use_cache=False)
    with pytest.raises(ValueError, match="use_cache"):
        greedy_continuations(wrapped, prefixes["equal"], SUFFIX_LEN, use_cache=True)


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_is_restored(training: bool) -> None:
    torch.manual_seed(0)
    model = _gpt2()
    model.train(training)
    greedy_continuations(model, torch.randint(0, VOCAB, (2, 4)), suffix_len=2)
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_train_mode_is_restored_after_an_error() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, input_ids: torch.Tensor) -> object:
            return {"no": "logits"}

    model = Broken().train()
    with pytest.raises(ValueError, match="logits"):
        greedy_continuations(model, torch.ones(1, 3, dtype=torch.long), suffix_len=2)
    assert model.training


def test_decoding_is_deterministic_in_train_mode_with_dropout() -> None:
    torch.manual_seed(0)
    model = _gpt2().train()  # dropout is on in train mode: greedy_continuations must switch it off
    prefixes = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(3))
    first = greedy_continuations(model, prefixes, suffix_len=5)
    second = greedy_continuations(model, prefixes, suffix_len=5)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, _hf_reference(model, list(prefixes), 5), rtol=0, atol=0)


def test_generates_exactly_suffix_len_tokens_even_when_the_model_wants_eos() -> None:
    torch.manual_seed(0)
    eos = 5
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2, eos_token_id=eos)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = eos

    def always_eos(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + torch.nn.functional.one_hot(torch.tensor(eos), VOCAB).to(output) * 1e4

    handle = model.lm_head.register_forward_hook(always_eos)
    try:
        prefixes = [torch.tensor([1, 2, 3]), torch.tensor([7, 8])]
        out = greedy_continuations(model, prefixes, suffix_len=9)
        # Hugging Face generate stops here: an EOS-wanting model would be cut after one token
        hf = model.generate(prefixes[0][None], max_new_tokens=9, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert out.shape == (2, 9)
    assert (out == eos).all()
    assert hf.shape[1] < 3 + 9


def test_pythia_parity_on_a_toy_model() -> None:
    """token_accuracy of our batched generation equals Pythia's eval_memorization.py formula on HF generate."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    context_tokens, true_continuation = data[:, :8], data[:, 8:16]
    with torch.no_grad():
        generations = model.generate(context_tokens, max_length=16, min_length=16, do_sample=False, pad_token_id=0)
    pythia = (true_continuation == generations[:, 8:16]).float().mean(-1)
    ours = greedy_continuations(model, context_tokens, suffix_len=8)
    torch.testing.assert_close(ours, generations[:, 8:16], rtol=0, atol=0)
    torch.testing.assert_close(token_accuracy(ours, true_continuation), pythia, rtol=0, atol=0)


def test_greedy_and_teacher_forced_matching_prefix_lengths_agree() -> None:
    """Method card §2.5: greedy and teacher-forced matching-prefix lengths are equal; exact => tf_acc = 1."""
    torch.manual_seed(0)
    model = _llama().double().eval()
    prefixes = torch.randint(0, VOCAB, (6, 5), generator=torch.Generator().manual_seed(4))
    greedy = greedy_continuations(model, prefixes, suffix_len=8)
    reference = greedy.clone()
    for row, position in enumerate([None, 0, 3, 7, None, 5]):  # corrupt some references at a known position
        if position is not None:
            reference[row, position] = (reference[row, position] + 1) % VOCAB
    with torch.no_grad():
        logits = model(torch.cat([prefixes, reference], 1)).logits[:, prefixes.shape[1] - 1 : -1]
    teacher_forced = logits.argmax(-1)
    assert matching_prefix_length(greedy, reference).tolist() == [8, 0, 3, 7, 8, 5]
    torch.testing.assert_close(
        matching_prefix_length(teacher_forced, reference), matching_prefix_length(greedy, reference)
    )
    exact = exact_match(greedy, reference).bool()
    assert (token_accuracy(teacher_forced, reference)[exact] == 1).all()


def test_model_without_lm_head_is_rejected() -> None:
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        greedy_continuations(model, torch.ones(1, 3, dtype=torch.long), suffix_len=2)


@pytest.mark.parametrize("suffix_len", [0, -1, True, 2.0])
def test_invalid_suffix_len_is_rejected(suffix_len: object) -> None:
    with pytest.raises(ValueError, match="suffix_len"):
        greedy_continuations(nn.Identity(), torch.ones(1, 3, dtype=torch.long), suffix_len=suffix_len)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [0, -2, False])
def test_invalid_batch_size_is_rejected(batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        greedy_continuations(nn.Identity(), torch.ones(1, 3, dtype=torch.long), 2, batch_size=batch_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "prefixes",
    [torch.ones(0, 3, dtype=torch.long), torch.ones(2, 0, dtype=torch.long), torch.ones(3, dtype=torch.long), []],
)
def test_empty_or_malformed_prefixes_are_rejected(prefixes: object) -> None:
    with pytest.raises(ValueError, match="prefix"):
        greedy_continuations(nn.Identity(), prefixes, suffix_len=2)  # type: ignore[arg-type]


def test_left_pad_layout() -> None:
    ids, mask = left_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="empty"):
        left_pad([torch.tensor([1]), torch.tensor([], dtype=torch.long)], pad_token_id=0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_cached_decoding_uses_the_current_cache_api_without_deprecation_warnings(name: str) -> None:
    """transformers deprecates `past_key_values` for `cache`: decoding must not warn (FutureWarning/DeprecationWarning
    as errors) and must still equal uncached decoding (each prefix alone, the whole sequence recomputed per step)."""
    torch.manual_seed(0)
    model = BUILDERS[name]().double().eval()
    g = torch.Generator().manual_seed(2)
    ragged = [torch.randint(1, VOCAB, (n,), generator=g) for n in PREFIX_LENGTHS]
    reference = torch.cat([greedy_continuations(model, p[None], SUFFIX_LEN, use_cache=False) for p in ragged])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        cached = greedy_continuations(model, ragged, SUFFIX_LEN, batch_size=3, use_cache=True)
        unpadded = greedy_continuations(model, torch.stack([p[:1] for p in ragged]), SUFFIX_LEN, use_cache=True)
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)
    short = torch.cat([greedy_continuations(model, p[None, :1], SUFFIX_LEN, use_cache=False) for p in ragged])
    torch.testing.assert_close(unpadded, short, rtol=0, atol=0)
