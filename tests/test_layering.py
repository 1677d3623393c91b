"""The layout of DESIGN.md: one top-level folder per layer, imported as `ember.<layer>`, imports
pointing down only, and stage logic that never needs Prefect."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import setuptools
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "model", "tasks", "flows", "deployments")

# What each layer may not import. The CLI (flows/cli.py) is the top layer: `ember demo` launches
# the app of deployments/, and nothing imports the CLI.
FORBIDDEN = {
    "storage": ("prefect", "gradio", "torch", "ember.model", "ember.tasks", "ember.flows", "ember.deployments"),
    "model": ("prefect", "gradio", "ember.storage", "ember.tasks", "ember.flows", "ember.deployments"),
    "tasks": ("prefect", "gradio", "ember.flows", "ember.deployments"),
    "flows": ("gradio", "ember.deployments", "ember.flows.cli"),
    "deployments": ("ember.flows.cli",),
}
# The demo serves releases: it needs the model and the release registry, never a stage or a flow.
FORBIDDEN_FILES = {
    "deployments/app.py": ("prefect", "ember.tasks", "ember.flows"),
    "deployments/releases_served.py": ("prefect", "ember.tasks", "ember.flows"),
}
ALLOWED = {"flows/cli.py": ("ember.deployments",)}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files() -> list[Path]:
    return sorted(p for folder in (*LAYERS, "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def banned_in(rel: str, names: set[str], banned: tuple[str, ...]) -> list[str]:
    allowed = ALLOWED.get(rel, ())
    return [
        f"{rel} imports {name}"
        for name in sorted(names)
        for ban in banned
        if (name == ban or name.startswith(ban + ".")) and ban not in allowed
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    offending = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        names = imports_of(path)
        offending += banned_in(rel, names, FORBIDDEN[layer] + FORBIDDEN_FILES.get(rel, ()))
    assert not offending, "\n".join(offending)


def test_layers_are_imported_only_with_the_ember_prefix():
    # The repository root is on sys.path under `python -m`, where `import tasks` would load a
    # second copy of a module beside `ember.tasks` (two STAGE objects, two loggers).
    offending = []
    for path in python_files():
        for name in imports_of(path):
            if name.split(".")[0] in LAYERS:
                offending.append(f"{path.relative_to(ROOT)} imports {name}; write ember.{name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno}: a relative import; write ember.<layer>...")
    assert not offending, "\n".join(offending)


def test_ember_links_each_layer_and_packages_every_folder():
    # ember/<layer> is a relative link to the layer's folder, so the same tree serves Python, a
    # wheel and the type checkers; a link missing or pointing elsewhere would split them.
    for layer in LAYERS:
        link = ROOT / "ember" / layer
        assert link.is_symlink() and os.readlink(link) == f"../{layer}", f"ember/{layer} should link to ../{layer}"
    # What a wheel holds: setuptools follows the links, so every package folder is in it.
    expected = sorted(
        ["ember"]
        + [
            "ember." + init.parent.relative_to(ROOT).as_posix().replace("/", ".")
            for layer in LAYERS
            for init in (ROOT / layer).rglob("__init__.py")
        ]
    )
    assert sorted(setuptools.find_packages(str(ROOT), include=["ember*"])) == expected
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"] == {
        "find": {"include": ["ember*"]}
    }


def test_the_stage_order_is_one_list():
    from ember.tasks.stages import STAGES

    assert [s.name for s in STAGES] == [
        "download",
        "normalize",
        "filter",
        "dedup",
        "train_tokenizer",
        "tokenize",
        "train",
        "quantize",
        "evaluate",
        "publish",
    ]
    # Each stage reads only stages before it.
    seen: set[str] = set()
    for stage in STAGES:
        assert set(stage.inputs) <= seen, f"{stage.name} reads {set(stage.inputs) - seen}, which come later"
        seen.add(stage.name)


def test_no_file_is_long_without_a_reason():
    # About 500 lines: past that a file is split by topic, or says at its top why it is not.
    long = []
    for path in python_files():
        lines = path.read_text().splitlines()
        if len(lines) > 520 and not any("over 500 lines" in line.lower() for line in lines[:40]):
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, "\n".join(long)
