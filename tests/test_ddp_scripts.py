"""Every 2-process DDP script destroys its process group at exit (an undestroyed gloo group aborted a CI run at
interpreter exit with "terminate called without an active exception", rc -6, after a green fit)."""

from __future__ import annotations

import ast

import pytest

from tests.helpers.ddp import SCRIPTS


def _calls(tree: ast.AST) -> set[str]:
    return {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("ddp_*.py")))
def test_script_destroys_its_process_group_in_a_finally(script):
    tree = ast.parse((SCRIPTS / script).read_text())
    finals = [stmt for node in ast.walk(tree) if isinstance(node, ast.Try) for stmt in node.finalbody]
    assert "destroy_process_group" in _calls(ast.Module(body=finals, type_ignores=[])), (
        f"{script} must call torch.distributed.destroy_process_group() in a `finally` block"
    )
