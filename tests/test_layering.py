"""The layers of DESIGN.md: imports point down only, and stage logic never needs Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ember"

# What each layer may not import. `tasks/prefect_stage.py` is the one Prefect wrapper of tasks/.
FORBIDDEN = {
    "storage": ("prefect", "gradio", "ember.model", "ember.tasks", "ember.flows", "ember.deployments"),
    "model": ("prefect", "gradio", "ember.storage", "ember.tasks", "ember.flows", "ember.deployments"),
    "tasks": ("prefect", "gradio", "ember.flows", "ember.deployments"),
    "flows": ("ember.deployments",),
}
# The CLI is the entry point above every layer: `ember demo` launches the app of deployments/.
ALLOWED = {"tasks/prefect_stage.py": ("prefect",), "flows/cli.py": ("ember.deployments",)}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    offending = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        allowed = ALLOWED.get(rel, ())
        for name in imports_of(path):
            for banned in FORBIDDEN[layer]:
                if (name == banned or name.startswith(banned + ".")) and banned not in allowed:
                    offending.append(f"{rel} imports {name}")
    assert not offending, "\n".join(offending)


def test_every_stage_module_declares_a_stage():
    from ember.flows.pipeline import STAGES

    assert [s.name for s in STAGES] == ["download", "normalize", "filter", "dedup", "train_tokenizer", "tokenize",
                                        "train", "quantize", "evaluate", "publish"]
