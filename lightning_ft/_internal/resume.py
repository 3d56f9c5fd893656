"""Resuming a callback's state with one behaviour for every family.

A stateful callback's ``state_key`` is its class name, so Lightning finds the state again whatever non-essential
arguments changed between a fit and its resume (cadence, logging, learning rates of offline phases, ...). The
arguments that define what the state means (its *essential* arguments) are stored in the state and compared on
resume by :func:`check_resumed_arguments`, which raises a ``ValueError`` naming what changed. Checkpoints written
while the key still held arguments (``"<class name>{<arguments>}"``, Lightning's ``_generate_state_key``) are found
by :func:`restore_legacy_state`, called from the callback's ``on_load_checkpoint``.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["check_resumed_arguments", "legacy_key_arguments", "restore_legacy_state"]


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, so that a tuple argument equals the list a checkpoint may hold."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_resumed_arguments(
    owner: Callback | str, saved: Mapping[str, Any] | None, current: Mapping[str, Any], reason: str
) -> None:
    """Raise a ``ValueError`` when ``current`` essential arguments differ from those ``saved`` in a checkpoint.

    ``saved`` None or empty (a checkpoint written before the arguments were stored) is accepted; only the arguments
    both hold are compared (one added to a callback later is absent from older states). ``reason`` says why the
    state is not valid under other values, e.g. "its baseline is not comparable with new checks".
    """
    if not saved:
        return
    changed = [
        f"{name}={saved[name]!r} -> {value!r}"
        for name, value in current.items()
        if name in saved and _plain(saved[name]) != _plain(value)
    ]
    if changed:
        name = owner if isinstance(owner, str) else type(owner).__name__
        raise ValueError(
            f"{name}: the checkpoint's state was made with other arguments ({', '.join(changed)}), so {reason}."
            " Resume with the checkpoint's values of these arguments, or start a new fit without `ckpt_path`."
        )


def legacy_key_arguments(key: str, prefix: str) -> dict[str, Any]:
    """The arguments an old state key ``"<prefix>{'name': value, ...}"`` holds ({} when they cannot be read)."""
    try:
        arguments = ast.literal_eval(key[len(prefix) :])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return {}
    return dict(arguments) if isinstance(arguments, dict) else {}


def restore_legacy_state(
    callback: Callback, checkpoint: Mapping[str, Any], current: Mapping[str, Any] | None = None, reason: str = ""
) -> bool:
    """Load ``callback``'s state from ``checkpoint`` when it is stored under an old argument-dependent key.

    Lightning only looks up the current ``state_key`` (and the class): call this from ``on_load_checkpoint``. The
    essential arguments the old key holds are checked against ``current`` (see :func:`check_resumed_arguments`).
    Several old states of the class (several instances in one Trainer) are ambiguous: a warning, none is restored.
    Returns whether a state was loaded.
    """
    states = checkpoint.get("callbacks") or {}
    key = callback.state_key
    if key in states or type(callback) in states:
        return False
    prefix = key + "{"
    legacy = [k for k in states if isinstance(k, str) and k.startswith(prefix)]
    if len(legacy) > 1:
        rank_zero_warn(
            f"{type(callback).__name__}: the checkpoint holds {len(legacy)} states of this callback under old keys"
            f" ({legacy}); none is restored."
        )
    if len(legacy) != 1:
        return False
    if current is not None:
        check_resumed_arguments(callback, legacy_key_arguments(legacy[0], key), current, reason)
    callback.load_state_dict(copy.deepcopy(states[legacy[0]]))
    return True
