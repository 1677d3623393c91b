"""Ember: raw text in, a small language model out, kept fresh.

The layers live in the repository's top-level folders (storage/, model/, tasks/, flows/,
deployments/); the entries of this folder are relative links to them, so `ember.storage` is
`storage/` for Python, setuptools, mypy, pyright and editors alike. Start reading at
`flows/pipeline.py` (the flow) and `tasks/stages.py` (the stages in order).
"""

from __future__ import annotations

from pathlib import Path

# A checkout without symbolic links (Windows without `core.symlinks`) has each link as a small
# text file holding its target. Python then finds the layers beside this folder instead; editors
# and type checkers need the links (README: "Working on Ember").
if not (Path(__file__).parent / "storage").is_dir():  # pragma: no cover - only on such a checkout
    __path__.append(str(Path(__file__).resolve().parents[1]))
