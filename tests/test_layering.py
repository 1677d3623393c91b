"""The layout of DESIGN.md: one top-level folder per layer, imported as `ember.<layer>` through
ember/'s relative links (for the type checker as well as for Python; a checkout without links
still runs), imports pointing down only, and stage logic that never needs Prefect."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
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
DEMO_BANS = ("prefect", "ember.tasks", "ember.flows")
FORBIDDEN_FILES = {"deployments/app.py": DEMO_BANS, "deployments/releases_served.py": DEMO_BANS}
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


def test_mypy_resolves_a_storage_symbol_from_a_flows_module(tmp_path):
    # A module of flows/ (its package __init__, read from a shadow file so nothing in the tree
    # changes) that imports a class of ember.storage: mypy must know the class, its methods'
    # signatures and its type. Were the import unresolved, Store would be Any: no revealed
    # signature, and the assignment below would pass unnoticed.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ember.storage.store import Store\n\nreveal_type(Store.ls)\nnot_a_store: int = Store\n", encoding="utf-8"
    )
    module = "ember/flows/__init__.py"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "--follow-imports", "silent"]
        + ["--shadow-file", module, str(probe), module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert "import-not-found" not in out and "Cannot find implementation" not in out, out
    revealed = [line for line in out.splitlines() if line.startswith(f"{module}:3: note: Revealed type is")]
    assert revealed and "ember.storage.store.Store" in revealed[0] and "ember.storage.store.Artifact" in revealed[0], (
        out
    )
    assert f'{module}:4: error: Incompatible types in assignment (expression has type "type[Store]"' in out, out
    assert result.returncode == 1, out  # that one error, on purpose


def test_ember_layers_are_the_top_level_folders_at_run_time():
    import ember.storage.store

    assert Path(ember.storage.store.__file__).resolve() == ROOT / "storage" / "store.py"


def test_a_checkout_without_links_still_imports_the_layers(tmp_path):
    # Windows without `core.symlinks` checks each link out as a text file holding its target:
    # ember/__init__.py then finds the layers beside its folder.
    (tmp_path / "ember").mkdir()
    shutil.copyfile(ROOT / "ember" / "__init__.py", tmp_path / "ember" / "__init__.py")
    for layer in LAYERS:
        (tmp_path / "ember" / layer).write_text(f"../{layer}", encoding="utf-8")
        (tmp_path / layer).symlink_to(ROOT / layer, target_is_directory=True)
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('ember.tasks.stages').origin)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(tmp_path / "tasks" / "stages.py")


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
