"""FLOWReweighting: the reference pass at train start equals FLOW set up by hand (weights, tau and the trained
parameters), logs, works for causal LMs at token level, and rejects what it cannot serve."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_ft.demos.rehearsal_text import RehearsalLM
from lightning_ft.demos.text import TokenChunks, pydoc_chunks
from lightning_ft.rehearsal import FLOWReweighting, FLOWWeighting, ReferenceStatistics, WithSampleIds
from tests.helpers.data import flow_datamodule
from tests.helpers.models import TINY_LM, tiny_lm_module, tiny_mlp_classifier
from tests.helpers.resume import quiet_trainer


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_callback_equals_flow_set_up_by_hand(tmp_path):
    torch.manual_seed(0)
    start = tiny_mlp_classifier().state_dict()
    data = flow_datamodule()

    by_hand = tiny_mlp_classifier()
    by_hand.load_state_dict(start)
    loader = DataLoader(data.train_dataloader().dataset, batch_size=256)
    by_hand.flow_weighting = FLOWWeighting(ReferenceStatistics.compute(by_hand, loader))
    quiet_trainer(max_epochs=2).fit(by_hand, data)

    module = tiny_mlp_classifier()
    module.load_state_dict(start)
    callback = FLOWReweighting()
    logger = CSVLogger(tmp_path)
    quiet_trainer(max_epochs=2, callbacks=[callback], logger=logger, log_every_n_steps=1).fit(module, data)

    assert module.flow_weighting is not None and by_hand.flow_weighting is not None
    assert module.flow_weighting.tau == pytest.approx(by_hand.flow_weighting.tau, rel=1e-6)
    assert torch.allclose(module.flow_weighting.weights, by_hand.flow_weighting.weights)
    assert torch.allclose(_params(module), _params(by_hand), atol=1e-6)
    assert float(module.flow_weighting.weights.mean()) < 0.9, "the weights are not all one: FLOW is active"
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "flow/tau" in metrics and "flow/mean_weight" in metrics


def test_a_second_fit_recomputes_the_statistics():
    callback = FLOWReweighting()
    data = flow_datamodule()
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(tiny_mlp_classifier(), data)
    first = callback.statistics
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(tiny_mlp_classifier(seed=1), data)  # another starting model
    assert callback.statistics is not first and not torch.equal(callback.statistics.loss, first.loss)


def test_token_level_for_a_causal_lm():
    torch.manual_seed(0)
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    chunks = WithSampleIds(TokenChunks(pydoc_chunks(16, "finetune")[:12]))
    callback = FLOWReweighting(level="token", task="causal_lm")
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, DataLoader(chunks, batch_size=4))
    assert module.flow_weighting is not None and module.flow_weighting.level == "token"
    assert module.flow_weighting.weights.shape == (12, 15)  # one weight per next-token position
    assert callback.statistics is not None and callback.statistics.token_nll is not None


def test_a_module_without_the_mixin_is_a_clear_error():
    with pytest.raises(ValueError, match="FLOWWeightedLoss"):
        quiet_trainer(max_epochs=1, callbacks=[FLOWReweighting()]).fit(tiny_lm_module(), flow_datamodule())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, "tau"),
        ({"level": "word"}, "level"),
        ({"normalize": "sum"}, "normalize"),
        ({"task": "detection"}, "task"),
        ({"level": "token"}, "causal_lm"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FLOWReweighting(**kwargs)
