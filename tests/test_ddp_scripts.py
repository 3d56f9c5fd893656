"""Every 2-process DDP script destroys its process group at exit (an undestroyed gloo group aborted a CI run at
interpreter exit with "terminate called without an active exception", rc -6, after a green fit)."""

from __future__ import annotations

import pytest

from tests.helpers.ddp import SCRIPTS


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("ddp_*.py")))
def test_script_destroys_its_process_group(script):
    assert "destroy_process_group()" in (SCRIPTS / script).read_text(), f"{script} must destroy its process group"
