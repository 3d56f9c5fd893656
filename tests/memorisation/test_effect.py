"""Effect tests on a real small run: fine-tuning memorises, early stopping and the regulariser reduce it.

A tiny GPT-2 is pre-trained on one half of CPython's pydoc topics (once per session, cached in a temporary
directory), then fine-tuned for 30 epochs on 32 chunks of the other half (``MemorisationDemoConfig`` defaults).
"""

from __future__ import annotations

import math

import pytest

from lightning_ft.demos.memorisation import FinetuneResult, MemorisationDemoConfig, finetune, pretrained_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config() -> MemorisationDemoConfig:
    return MemorisationDemoConfig()


@pytest.fixture(scope="module")
def base(config, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LIGHTNING_FT_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield pretrained_base(config, verbose=False)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def plain(config, base) -> FinetuneResult:
    return finetune("plain", config, base)


def test_plain_finetuning_memorises(plain, config):
    start, end = plain.history[0], plain.history[-1]
    assert plain.epochs_trained == config.epochs
    assert start["ngram"] < 0.05 and start["exact"] == 0.0  # the base model has not seen these chunks
    assert end["ngram"] - start["ngram"] >= 0.3, plain.history
    assert end["exact"] >= 0.2, plain.history
    assert end["token_acc"] > start["token_acc"] + 0.3


def test_early_stopping_stops_early_with_less_memorisation(plain, config, base):
    stopped = finetune("early_stopping", config, base)
    assert stopped.epochs_trained < config.epochs, "MemorisationEarlyStopping never fired"
    assert stopped.exact <= 0.5 * plain.exact - 0.1, (stopped, plain.exact)
    assert stopped.ngram <= 0.5 * plain.ngram, (stopped, plain.ngram)
    # stopping early also keeps the model closer to the validation optimum
    assert stopped.val_ppl < plain.val_ppl


def test_best_ngram_restores_best_validation_weights_inside_the_bound(plain, config, base):
    best = finetune("best_ngram", config, base)
    baseline = best.history[0]["ngram"]
    assert best.epochs_trained < config.epochs
    assert best.ngram <= baseline + config.max_rise
    first_val = min(h["val_loss"] for h in best.val_history)
    assert best.val_ppl == pytest.approx(math.exp(first_val), rel=1e-3)  # the best epoch's weights


def test_regularizer_lowers_memorisation(plain, config, base):
    regularized = finetune("regularizer", config, base)
    assert regularized.ngram <= 0.8 * plain.ngram, (regularized, plain.ngram)
    assert regularized.exact < plain.exact
