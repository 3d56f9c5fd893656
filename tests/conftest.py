"""Test-suite defaults: W&B is a no-op and Hugging Face never reaches the network (tests may override both)."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
