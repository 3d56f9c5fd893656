"""Shared test helpers: tiny models and data (no download), a 2-process CPU DDP runner, a stop-and-resume helper."""
