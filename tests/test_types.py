"""Imports every tool can follow: `ember.<layer>` is the layer's folder for the type checker as
well as for Python, through ember/'s relative links, and a checkout without links still runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "model", "tasks", "flows", "deployments")


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
