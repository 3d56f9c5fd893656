"""Batched greedy decoding with a KV cache and left padding, for memorisation probes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.validation import check_int

if TYPE_CHECKING:
    from transformers import Cache

__all__ = ["check_causal_lm", "eval_mode", "greedy_continuations", "left_pad", "supports_kv_cache"]


def check_causal_lm(model: nn.Module) -> None:
    """Raise a ``ValueError`` if ``model`` is a Hugging Face model without a causal-LM head."""
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is not None and hasattr(model, "config") and get_head() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-model head (get_output_embeddings() is None), so it cannot"
            " generate. Load it with transformers.AutoModelForCausalLM (e.g. GPT2LMHeadModel, LlamaForCausalLM)."
        )


def supports_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model (takes ``attention_mask`` and a KV cache as keyword arguments)."""
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings")


def left_pad(sequences: Sequence[Tensor], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad 1-D token-id tensors into ``(input_ids, attention_mask)`` of shape ``(B, max_len)``."""
    if len(sequences) == 0:
        raise ValueError("no prefixes to pad: `prefixes` is empty.")
    width = max(int(s.numel()) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq.numel() == 0:
            raise ValueError(f"prefix {row} is empty; every prefix needs at least one token.")
        ids[row, width - seq.numel() :] = seq
        mask[row, width - seq.numel() :] = 1
    return ids, mask


def _logits(output: object) -> Tensor:
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise ValueError(
            "the model's output has no `logits`; pass a causal LM (transformers AutoModelForCausalLM) or a module"
            " whose forward returns logits of shape (B, T, V)."
        )
    return logits


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The named parameters of the forward of ``model``, looking through a PEFT wrapper (``get_base_model()``), whose
    own forward passes everything on as ``**kwargs``."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return inspect.signature(base.forward).parameters


def _cache_keyword(model: nn.Module, params: Mapping[str, inspect.Parameter]) -> str:
    """The keyword that takes the KV cache: ``cache`` (current transformers) or ``past_key_values`` (older)."""
    for key in ("cache", "past_key_values"):
        if key in params:
            return key
    raise ValueError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`, so it cannot decode with a KV"
        " cache. Pass use_cache=False, or point `model_attr` at the transformers causal LM inside it."
    )


def _new_cache(model: nn.Module) -> Cache:
    """An empty ``transformers.DynamicCache`` for ``model`` (built from its config where this transformers allows)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    if config is not None and "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


def _returned_cache(output: object, key: str, passed: Cache) -> Cache:
    """The cache the model returned under ``key`` (for a ``DynamicCache``: ``passed`` itself, updated in place)."""
    if isinstance(output, Mapping) and output.get(key) is not None:
        return output[key]
    return passed


@torch.no_grad()  # not inference_mode: buffers a model creates lazily here must stay usable by autograd
def _decode_batch(model: nn.Module, ids: Tensor, mask: Tensor | None, suffix_len: int, use_cache: bool) -> Tensor:
    if not use_cache:  # plain module returning logits: recompute the full sequence each step
        out = ids
        for _ in range(suffix_len):
            try:
                logits = _logits(model(out))
            except TypeError as err:
                raise ValueError(
                    f"{type(model).__name__}.forward(input_ids) failed ({err}); a plain module must map (B, T) token"
                    " ids to (B, T, V) logits. Wrap it, or use a transformers AutoModelForCausalLM."
                ) from err
            if logits.dim() != 3 or logits.shape[:2] != out.shape:
                raise ValueError(
                    f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for input"
                    f" {tuple(out.shape)}; expected (B, T, V) with batch first."
                )
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
        return out[:, ids.shape[1] :]
    # left padding: position ids that skip the pads; no padding: let the model count positions from its cache
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)
    params = _forward_parameters(model)
    cache_key = _cache_keyword(model, params)
    cache = _new_cache(model)
    # prefill: only the last position's logits are needed (skips a (B, P, V) LM-head product where supported)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    output = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{cache_key: cache}, **extra
    )
    cache = _returned_cache(output, cache_key, cache)
    nxt = _logits(output)[:, -1].argmax(-1, keepdim=True)
    generated = torch.empty((ids.shape[0], suffix_len), dtype=torch.long, device=ids.device)
    generated[:, 0:1] = nxt
    next_pos = None if position_ids is None else position_ids[:, -1:] + 1
    for step in range(1, suffix_len):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        output = model(input_ids=nxt, attention_mask=mask, position_ids=next_pos, use_cache=True, **{cache_key: cache})
        cache = _returned_cache(output, cache_key, cache)
        nxt = _logits(output)[:, -1].argmax(-1, keepdim=True)
        generated[:, step : step + 1] = nxt
        if next_pos is not None:
            next_pos = next_pos + 1
    return generated


def greedy_continuations(
    model: nn.Module,
    prefixes: Tensor | Sequence[Tensor],
    suffix_len: int,
    batch_size: int = 64,
    pad_token_id: int | None = None,
    use_cache: bool | None = None,
    progress: bool = False,
) -> Tensor:
    """Greedy continuations of exactly ``suffix_len`` tokens for every prefix, batched with a KV cache.

    Prefixes of different lengths are left-padded (with position ids that skip the padding), so each row decodes as
    it would alone. End-of-sequence tokens do not stop decoding (``min_new_tokens = max_new_tokens = suffix_len``,
    as in Pythia's memorisation script). Runs without gradient in eval mode and restores every submodule's
    train/eval mode afterwards.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``) or a module whose forward maps ``(B, T)`` ids to
            ``(B, T, V)`` logits.
        prefixes: a ``(N, P)`` token-id tensor, or a sequence of 1-D tensors of any lengths.
        suffix_len: number of tokens to generate, ``>= 1``.
        batch_size: prefixes decoded together, ``>= 1``.
        pad_token_id: id written in padding positions (masked out, so any valid id; default 0).
        use_cache: decode with the KV cache. Default: True for Hugging Face models; a plain module does not return a
            cache, so it is recomputed over the whole sequence at each step (``use_cache=True`` then raises).

    Returns:
        ``(N, suffix_len)`` int64 tensor on the model's device.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
        >>> greedy_continuations(lm, torch.randint(0, 64, (5, 8)), suffix_len=4).shape
        torch.Size([5, 4])
    """
    check_int("suffix_len", suffix_len)
    check_int("batch_size", batch_size)
    check_causal_lm(model)
    hf_model = supports_kv_cache(model)
    if use_cache is None:
        use_cache = hf_model
    elif use_cache and not hf_model:
        raise ValueError(
            f"use_cache=True needs a Hugging Face causal LM that returns a KV cache; {type(model).__name__}"
            " is a plain module. Pass use_cache=False (recomputes the sequence each step) or wrap a transformers model."
        )
    if pad_token_id is None:
        pad_token_id = 0  # padding is masked out and skipped by the position ids: any valid id will do
    if isinstance(prefixes, Tensor):
        if prefixes.dim() != 2 or prefixes.shape[0] == 0 or prefixes.shape[1] == 0:
            raise ValueError(f"`prefixes` must be a non-empty (N, P) token-id tensor, got {tuple(prefixes.shape)}.")
        ids_all, mask_all = prefixes.long(), torch.ones_like(prefixes, dtype=torch.long)
    else:
        ids_all, mask_all = left_pad(list(prefixes), pad_token_id)
    if not use_cache and not bool(mask_all.all()):
        raise ValueError("prefixes of different lengths need a Hugging Face causal LM (attention mask + KV cache).")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    starts = range(0, ids_all.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="memorisation probe", unit="batch", leave=False)
    with eval_mode(model):
        outputs = []
        for start in starts:
            ids = ids_all[start : start + batch_size].to(device)
            mask = mask_all[start : start + batch_size]
            # no padding in this batch: let the model use its causal fast path (no explicit attention mask)
            mask = None if bool(mask.all()) else mask.to(device)
            outputs.append(_decode_batch(model, ids, mask, suffix_len, use_cache))
        return torch.cat(outputs)
