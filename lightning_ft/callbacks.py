"""Every lightning-ft callback, importable by short name (LightningCLI: ``class_path: MemorisationMonitor``)."""

from lightning_ft.memorisation.callbacks import MemorisationEarlyStopping, MemorisationMonitor

__all__ = ["MemorisationEarlyStopping", "MemorisationMonitor"]
