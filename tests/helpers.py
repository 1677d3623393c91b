"""What many tests share: where the corpora are, running one stage's logic in a temp folder, and
the browser tests' Chromium flags and screenshots."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.tasks.stage import Reporter, Stage, StageContext, sequential_map

# `../shared/corpora`: the real text kept beside the repo, never copied into it.
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def stage_context(
    tmp_path: Path,
    name: str,
    inputs: dict[str, Path] | None = None,
    *,
    mapper: Callable[..., list] | None = None,
    store_root: Path | None = None,
    work: Path | None = None,
    reporter: Reporter | None = None,
    resources: dict[str, Path] | None = None,
) -> StageContext:
    """The context a stage runs in, as `run_stage` makes it, without the store: the output in
    `tmp_path/name`, scratch in `tmp_path/name-work` (both created)."""
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    work = work or tmp_path / f"{name}-work"
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(
        inputs=dict(inputs or {}),
        out=out,
        work=work,
        report=reporter or Reporter(name),
        store_root=store_root or tmp_path,
        map=mapper or sequential_map,
        resources=dict(resources or {}),
    )


def run_stage_in(
    tmp_path: Path, stage: Stage, cfg: Any, inputs: dict[str, Path] | None = None, name: str | None = None, **context
) -> tuple[Path, dict]:
    """Run a stage's logic into `tmp_path/<name or stage name>`; returns (its output folder, metrics)."""
    ctx = stage_context(tmp_path, name or stage.name, inputs, **context)
    return ctx.out, stage.run(cfg, ctx)


# Headless in a sandboxed CI box with no network: no GPU, no sandbox (root), and none of
# Chromium's own background connections (each would be refused, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def screenshot(page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    """A PNG of a Playwright page in tmp_path, copied to $EMBER_SCREENSHOTS when that is set
    (`make screenshots` sets it to docs/screenshots/, which the README shows)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    if os.environ.get("EMBER_SCREENSHOTS"):
        folder = Path(os.environ["EMBER_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / name)
    return path
