"""lightning-ft: fine-tuning techniques for PyTorch Lightning.

Each technique is a Lightning ``Callback``, a ``LightningModule`` mixin or a sampler with a pure functional core.
"""

from lightning_ft.memorisation import (
    MemorisationEarlyStopping,
    MemorisationMonitor,
    MemorisationScore,
    NGramRegularizedLM,
    NGramRegularizer,
)

__version__ = "0.1.0"

__all__ = [
    "MemorisationEarlyStopping",
    "MemorisationMonitor",
    "MemorisationScore",
    "NGramRegularizedLM",
    "NGramRegularizer",
    "__version__",
]
