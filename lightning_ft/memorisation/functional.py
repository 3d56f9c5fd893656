"""Pure tensor functions for memorisation: n-gram score, exact match, token accuracy, regulariser, Goldfish.

Every function works on token ids (or per-token log-probabilities), is batched and needs no Trainer.

References:
    Slack & Al Moubayed, "Early Detection and Reduction of Memorisation for Domain Adaptation and Instruction
    Tuning", TACL 13 (2025), arXiv:2510.11372 (n-gram memorisation score, n-gram-aware regulariser).
    Carlini et al., "Quantifying Memorization Across Neural Language Models", arXiv:2202.07646 (k-extractable).
    Biderman et al., "Emergent and Predictable Memorization in Large Language Models", 2023 (token accuracy).
    Hans et al., "Be like a Goldfish, Don't Memorize!", 2024 (Goldfish loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_ft._internal.validation import check_int

__all__ = [
    "exact_match",
    "goldfish_mask",
    "matching_prefix_length",
    "ngram_memorisation_score",
    "ngram_regularizer",
    "teacher_forced_accuracy",
    "token_accuracy",
    "token_logprobs",
    "validate_ngram_sizes",
]

Match = Literal["bag", "positional"]
# pairwise window comparison is chunked over the batch so that it never materialises more than this many bools
_MAX_PAIRWISE_ELEMENTS = 1 << 24


def validate_ngram_sizes(n: int | Sequence[int], name: str = "n") -> tuple[int, ...]:
    """Return ``n`` as a sorted tuple of distinct positive ints, or raise a ``ValueError`` naming ``name``."""
    sizes = (n,) if isinstance(n, int) else tuple(n)
    if not sizes:
        raise ValueError(f"`{name}` is empty; pass at least one n-gram size, e.g. {name}=(4, 5, 6).")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`{name}` must hold integers >= 1, got {size!r} in {sizes!r}; e.g. {name}=(4, 5, 6).")
    return tuple(sorted(set(sizes)))


def _as_batch(generated: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, bool]:
    if not isinstance(generated, Tensor) or not isinstance(reference, Tensor):
        raise TypeError("`generated` and `reference` must be integer token-id tensors of shape (S,) or (B, S).")
    if generated.shape != reference.shape:
        raise ValueError(
            f"`generated` {tuple(generated.shape)} and `reference` {tuple(reference.shape)} must have the same shape;"
            " generate exactly `suffix_len` tokens per reference (greedy_continuations does)."
        )
    if generated.dim() not in (1, 2):
        raise ValueError(f"token-id tensors must be 1-D (S,) or 2-D (B, S), got shape {tuple(generated.shape)}.")
    if generated.is_floating_point() or reference.is_floating_point():
        raise TypeError("`generated` and `reference` must hold integer token ids, not floats.")
    single = generated.dim() == 1
    if single:
        generated, reference = generated.unsqueeze(0), reference.unsqueeze(0)
    return generated, reference, single


def _ngram_fraction(generated: Tensor, reference: Tensor, n: int, match: Match) -> Tensor:
    """Fraction of the reference's n-grams found in the generation, per sample: shape (B,)."""
    gen_w = generated.unfold(1, n, 1)  # (B, W, n)
    ref_w = reference.unfold(1, n, 1)
    if match == "positional":
        return (gen_w == ref_w).all(-1).float().mean(-1)
    # bag: clipped multiset counts, sum_g min(c_gen(g), c_ref(g)) / |G(ref)|, from pairwise window equality.
    batch, windows = ref_w.shape[:2]
    chunk = max(1, _MAX_PAIRWISE_ELEMENTS // (windows * windows * n))
    out = []
    for start in range(0, batch, chunk):
        g, r = gen_w[start : start + chunk], ref_w[start : start + chunk]
        cross = (g.unsqueeze(2) == r.unsqueeze(1)).all(-1)  # (b, Wg, Wr): gen window i == ref window j
        self_ref = (r.unsqueeze(2) == r.unsqueeze(1)).all(-1)  # (b, Wr, Wr)
        count_gen = cross.sum(1).float()  # occurrences in the generation of the n-gram at ref position j
        count_ref = self_ref.sum(1).float()  # occurrences in the reference of the same n-gram (>= 1)
        # each distinct n-gram g appears count_ref(g) times over j: divide to count it once.
        clipped = (torch.minimum(count_gen, count_ref) / count_ref).sum(-1)
        out.append(clipped / windows)
    return torch.cat(out)


def ngram_memorisation_score(
    generated: Tensor, reference: Tensor, n: int | Sequence[int] = (4, 5, 6), match: Match = "bag"
) -> Tensor:
    """Per-sample n-gram memorisation score: the mean over ``n`` of the fraction of reference n-grams generated.

    For a greedy continuation ``ŝ`` of a training prompt with true suffix ``s``,
    ``M = mean_{n in N} |G_n(ŝ) ∩ G_n(s)| / |G_n(s)|``, where ``G_n`` is the multiset of n-grams and the
    intersection clips counts (``match="bag"``, like BLEU's modified precision) or ``match="positional"``, where the
    n-gram at position ``i`` of ``ŝ`` must equal the one at position ``i`` of ``s``.

    An n larger than the sequence length is clipped to the length (the whole sequence is its only n-gram), so the
    score of sequences shorter than ``n`` is their exact-match indicator.

    Args:
        generated: token ids of shape ``(S,)`` or ``(B, S)``.
        reference: token ids of the same shape.
        n: n-gram sizes ``N``; the paper uses "4-, 5-, 6-grams" (exact set not published).
        match: ``"bag"`` (default) or ``"positional"``.

    Returns:
        Float scores in ``[0, 1]``, shape ``(B,)`` (a 0-d tensor for 1-D inputs).

    Example::

        >>> s = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
        >>> ngram_memorisation_score(s, s).item()
        1.0
        >>> ngram_memorisation_score(s.flip(0), s).item()
        0.0
    """
    sizes = validate_ngram_sizes(n)
    if match not in ("bag", "positional"):
        raise ValueError(f'`match` must be "bag" or "positional", got {match!r}.')
    generated, reference, single = _as_batch(generated, reference)
    length = reference.shape[1]
    if length == 0:
        raise ValueError("cannot score empty sequences: `reference` has length 0.")
    scores = torch.stack([_ngram_fraction(generated, reference, min(size, length), match) for size in sizes]).mean(0)
    return scores[0] if single else scores


def exact_match(generated: Tensor, reference: Tensor) -> Tensor:
    """Per-sample k-extractable indicator (Carlini et al. 2022): 1.0 where every generated token equals the suffix."""
    generated, reference, single = _as_batch(generated, reference)
    out = (generated == reference).all(-1).float()
    return out[0] if single else out


def token_accuracy(generated: Tensor, reference: Tensor) -> Tensor:
    """Per-sample fraction of positions where the generation equals the suffix (Pythia's memorisation score).

    Identical to ``(true_continuation == generations).float().mean(-1)`` in Pythia's ``eval_memorization.py``.
    """
    generated, reference, single = _as_batch(generated, reference)
    out = (generated == reference).float().mean(-1)
    return out[0] if single else out


def matching_prefix_length(generated: Tensor, reference: Tensor) -> Tensor:
    """Per-sample number of leading tokens where the generation equals the suffix (int64)."""
    generated, reference, single = _as_batch(generated, reference)
    out = (generated == reference).long().cumprod(-1).sum(-1)
    return out[0] if single else out


def teacher_forced_accuracy(logits: Tensor, reference: Tensor) -> Tensor:
    """Per-sample teacher-forced proxy: fraction of suffix positions where ``argmax p(. | p, s_<i) == s_i``.

    ``logits`` are the model's predictions for the suffix positions, shape ``(B, S, V)``. One forward pass instead
    of ``S`` decode steps. It is not greedy agreement position by position, but the teacher-forced and greedy
    matching-prefix lengths are equal, so a greedily extracted sample has accuracy 1.
    """
    if logits.dim() != 3 or logits.shape[:2] != reference.shape:
        raise ValueError(f"`logits` must have shape (B, S, V) matching `reference` {tuple(reference.shape)}.")
    return (logits.argmax(-1) == reference).float().mean(-1)


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Causal-LM per-token log-probabilities of the next token and the mask of supervised positions.

    Uses the Hugging Face convention: ``labels`` are aligned with the inputs and shifted here, so position ``t``
    of the result is ``log p(labels[t + 1] | x_<=t)``.

    Returns:
        ``(logprobs, mask)``, both of shape ``(B, T - 1)``; ``logprobs`` is 0 where ``mask`` is False.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} must be (B, T, V) with `labels` of shape (B, T).")
    targets = labels[:, 1:]
    mask = targets != ignore_index
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~mask, 0.0), mask


def ngram_regularizer(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    ngram_sizes: int | Sequence[int] = (4,),
    gamma: float = 0.9,
    delta: float = 0.0,
    variant: Literal["A", "B"] = "A",
) -> Tensor:
    """n-gram-aware memorisation penalty (reconstruction of Slack & Al Moubayed 2025, whose formula is unpublished).

    With ``L_n(t)`` and ``L0_n(t)`` the sums of the current and reference log-probs over the n-gram window ending at
    ``t`` (windows must lie entirely on supervised positions) and ``conf_n(t) = exp(L_n(t) / n)``:

    * variant ``"A"``: ``R = mean_{t, n} 1[conf_n(t) > gamma] * relu((L_n(t) - L0_n(t)) / n - delta)``;
    * variant ``"B"``: the token-level hinge, i.e. variant A with ``N = (1,)``.

    The gate is computed without gradient and ``ref_logprobs`` never receives gradient. Window sums use unfolded
    windows, O(T n) per ``n`` (n is small), in at least fp32.

    Args:
        logprobs: current model's per-token log-probs ``(B, T)`` (with grad), e.g. from :func:`token_logprobs`.
        ref_logprobs: frozen reference model's per-token log-probs, same shape.
        mask: bool ``(B, T)``, True on supervised positions.
        ngram_sizes: window sizes ``N`` (variant A).
        gamma: confidence gate in ``[0, 1)``: only n-grams whose geometric-mean probability exceeds it count.
        delta: margin (per-token excess log-likelihood allowed before the penalty starts), ``>= 0`` recommended.
        variant: ``"A"`` or ``"B"``.

    Returns:
        A scalar tensor (0 when no window qualifies).
    """
    if variant not in ("A", "B"):
        raise ValueError(f'`variant` must be "A" or "B", got {variant!r}.')
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"`gamma` must be in [0, 1), got {gamma}.")
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"`logprobs` {tuple(logprobs.shape)}, `ref_logprobs` {tuple(ref_logprobs.shape)} and `mask`"
            f" {tuple(mask.shape)} must have the same (B, T) shape."
        )
    sizes = (1,) if variant == "B" else validate_ngram_sizes(ngram_sizes, "ngram_sizes")
    mask = mask.bool()
    # fp32 at least: bf16 log-probs would make the hinge noisy; windows are summed directly (n is small), which is
    # exact per window, unlike differences of long cumulative sums
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    cur = logprobs.to(dtype).masked_fill(~mask, 0.0)
    ref = ref_logprobs.detach().to(dtype).masked_fill(~mask, 0.0)
    total = cur.new_zeros(())
    count = cur.new_zeros(())
    for n in sizes:
        if n > cur.shape[1]:
            continue
        window = cur.unfold(1, n, 1).sum(-1)  # (B, T - n + 1): window ending at t = j + n - 1
        window0 = ref.unfold(1, n, 1).sum(-1)
        valid = mask.unfold(1, n, 1).all(-1)  # windows that cross an unsupervised position do not count
        with torch.no_grad():
            gate = valid & (torch.exp(window / n) > gamma)
        excess = torch.relu((window - window0) / n - delta)
        total = total + (excess * gate).sum()
        count = count + valid.sum()
    return total / count.clamp_min(1)


_GOLDFISH_TABLE_SIZE = 1_000_003
_GOLDFISH_SEED = 2971215073
_goldfish_tables: dict[torch.device, Tensor] = {}


def _goldfish_table(device: torch.device) -> Tensor:
    if device not in _goldfish_tables:
        table = torch.rand(_GOLDFISH_TABLE_SIZE, generator=torch.Generator().manual_seed(_GOLDFISH_SEED))
        _goldfish_tables[device] = table.to(device)
    return _goldfish_tables[device]


def goldfish_mask(
    labels: Tensor,
    k: int = 4,
    h: int = 13,
    strategy: Literal["hash-table", "static"] = "hash-table",
    ignore_index: int = -100,
) -> Tensor:
    """Goldfish loss (Hans et al. 2024): drop about ``1/k`` of the target tokens from the loss, deterministically.

    ``"hash-table"`` (the paper's default) hashes the ``h`` target tokens ending at and including position ``t``
    (product of ids modulo 1,000,003, looked up in a table of uniforms seeded with 2971215073, as in the official
    ``apply_goldfish``) and drops token ``t`` when the value is below ``1/k``; the same text is always dropped at the
    same places, so the model never sees the full passage. Positions ``t < h - 1`` are never dropped, and neither
    are positions whose window holds ``ignore_index`` (so padding and prompt masking cannot change which response
    tokens are dropped; the official code hashes such windows too). ``"static"`` drops every ``k``-th token.

    Args:
        labels: target ids ``(B, T)`` (for Hugging Face models, the ``labels`` you pass to the model).
        k: drop frequency, ``k >= 2``. Public checkpoints use k in {3, 4, 8, 32, 128}.
        h: hash context width, ``h >= 1`` (official code default 4; public checkpoints 13).
        strategy: ``"hash-table"`` or ``"static"``.
        ignore_index: the value written at dropped positions.

    Returns:
        A copy of ``labels`` with dropped positions set to ``ignore_index``.

    Example::

        >>> labels = torch.arange(100).reshape(1, 100) + 10
        >>> dropped = (goldfish_mask(labels, k=4, h=4) == -100).float().mean().item()
        >>> 0.1 < dropped < 0.4
        True
    """
    check_int("k", k, minimum=2)  # drop 1/k of the tokens
    check_int("h", h)  # goldfish context width
    if labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"`labels` must be an integer tensor of shape (B, T), got {tuple(labels.shape)}.")
    out = labels.clone()
    if strategy == "static":
        drop = torch.zeros_like(labels, dtype=torch.bool)
        drop[:, k - 1 :: k] = True
    elif strategy == "hash-table":
        drop = torch.zeros_like(labels, dtype=torch.bool)
        if labels.shape[1] >= h:
            windows = labels.unfold(1, h, 1)  # (B, T - h + 1, h), window ending at t = j + h - 1
            keys = torch.remainder(windows.prod(-1), _GOLDFISH_TABLE_SIZE)
            clean = (windows != ignore_index).all(-1)
            drop[:, h - 1 :] = (_goldfish_table(labels.device)[keys] < 1.0 / k) & clean
    else:
        raise ValueError(f'`strategy` must be "hash-table" or "static", got {strategy!r}.')
    return out.masked_fill(drop, ignore_index)
