"""What many tests share: where the corpora are, and running one stage's logic in a temp folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ember.tasks.stage import Reporter, Stage, StageContext, sequential_map

# `../shared/corpora`: the real text kept beside the repo, never copied into it.
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def stage_context(tmp_path: Path, name: str, inputs: dict[str, Path] | None = None, *,
                  mapper: Callable[..., list] | None = None, store_root: Path | None = None,
                  work: Path | None = None, reporter: Reporter | None = None,
                  resources: dict[str, Path] | None = None) -> StageContext:
    """The context a stage runs in, as `run_stage` makes it, without the store: the output in
    `tmp_path/name`, scratch in `tmp_path/name-work` (both created)."""
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    work = work or tmp_path / f"{name}-work"
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(inputs=dict(inputs or {}), out=out, work=work, report=reporter or Reporter(name),
                        store_root=store_root or tmp_path, map=mapper or sequential_map,
                        resources=dict(resources or {}))


def run_stage_in(tmp_path: Path, stage: Stage, cfg: Any, inputs: dict[str, Path] | None = None,
                 name: str | None = None, **context) -> tuple[Path, dict]:
    """Run a stage's logic into `tmp_path/<name or stage name>`; returns (its output folder, metrics)."""
    ctx = stage_context(tmp_path, name or stage.name, inputs, **context)
    return ctx.out, stage.run(cfg, ctx)
