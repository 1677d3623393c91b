"""What every stage has in common: its contract, the store round-trip, and its Prefect task.

A stage is a plain function `run(cfg, ctx) -> metrics` over files: `cfg` is the stage's own
pydantic config section, `ctx.inputs` maps each upstream stage name to its artifact folder,
and everything written under `ctx.out` becomes the artifact. It knows nothing of Prefect; it
tells a person what it did through `ctx.report`, which logs by default and becomes Prefect
artifacts (tables, markdown, progress) when the stage runs inside a flow.

`run_stage` wraps any stage with the store: compute the key, return at once when the artifact
is complete (a cache hit), else take the key's lock, run into a temporary folder and commit.
`stage_task` is the same call as a Prefect task whose final state is named "Cached" on a hit,
so the UI shows it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from ember.storage.store import Store, compute_key, make_ref


class Reporter:
    """How stage logic reports to a person. This base class only logs; see PrefectReporter."""

    def __init__(self, stage: str):
        self.stage = stage
        self.log = logging.getLogger(f"ember.{stage}")
        self._last_progress = 0.0

    def progress(self, done: float, total: float, what: str = "") -> None:
        """Long loops call this often; it is rate-limited here, not by callers."""
        now = time.monotonic()
        if done < total and now - self._last_progress < 5.0:
            return
        self._last_progress = now
        pct = 100.0 * done / total if total else 100.0
        self.log.info("%s %.0f%% (%s/%s)", what or self.stage, pct, _fmt(done), _fmt(total))
        self._on_progress(min(pct, 100.0))

    def table(self, key: str, rows: list[dict], description: str = "") -> None:
        self.log.info("%s\n%s", description or key, text_table(rows))

    def markdown(self, key: str, text: str, description: str = "") -> None:
        self.log.info("%s:\n%s", description or key, text)

    def _on_progress(self, pct: float) -> None:
        pass


def text_table(rows: list[dict]) -> str:
    """Rows of dicts as aligned plain text, for logs and terminals."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [columns] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def sequential_map(fn: Callable[[Any], Any], items: list, name: str = "") -> list:
    return [fn(item) for item in items]


def pool_map(workers: int) -> Callable[..., list]:
    """A `ctx.map` that runs units in `workers` processes (results in input order).

    Units are picklable by contract (module-level functions, plain arguments). forkserver, not
    fork: the parent may hold torch's or Prefect's threads, which a forked child would inherit
    in whatever state they were in. Each call starts its own pool: once the forkserver runs (its
    first start, which imports what `set_forkserver_preload` names, is the slow part: 0.6 s),
    a pool of 2 starts in about 0.03 s, and fresh workers hand back each stage's memory. Reused
    across normalize, filter and dedup (benchmarks/data_bench.py), workers kept about 200 MB
    each from stage to stage and raised the process tree's peak from 542 to 721 MB.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def run(fn: Callable[[Any], Any], items: list, name: str = "") -> list:
        if workers <= 1 or len(items) <= 1:
            return sequential_map(fn, items, name)
        with ProcessPoolExecutor(max_workers=min(workers, len(items)),
                                 mp_context=multiprocessing.get_context("forkserver")) as pool:
            return list(pool.map(fn, items))

    return run


@dataclass
class StageContext:
    inputs: dict[str, Path]  # upstream stage name -> its (read-only) artifact folder
    out: Path  # temporary artifact folder: all of it is committed when `run` returns
    work: Path  # scratch for this key that survives a crash (checkpoints); deleted on commit
    report: Reporter
    store_root: Path | None = None  # for the one stage that writes outside artifacts (publish -> releases/)
    ref: str = ""  # this artifact's ref, `stage/key`
    # How a stage runs its independent units of work (one per shard): `map(fn, items, name)`.
    # In order here; under Prefect each unit is a task run of its own, visible in the UI.
    map: Callable[..., list] = sequential_map
    # Folders from outside the store that the flow hands this stage (train: the release to
    # warm-start from). A stage never looks for them itself; what identifies them is in its key.
    resources: dict[str, Path] = field(default_factory=dict)

    @property
    def log(self) -> logging.Logger:
        return self.report.log


@dataclass(frozen=True)
class Stage:
    name: str  # also the name of its section in the pipeline config
    version: int  # bump when a change of logic changes what the stage produces
    run: Callable[[Any, StageContext], dict]
    inputs: tuple[str, ...] = ()  # the stages whose artifacts it reads (ctx.inputs)
    # Config fields that do not change the output (e.g. a progress interval) stay out of the key.
    unkeyed: tuple[str, ...] = ()

    def params(self, cfg: BaseModel | None) -> dict:
        return cfg.model_dump(mode="json", exclude=set(self.unkeyed)) if cfg is not None else {}


@dataclass
class Outcome:
    stage: str
    ref: str
    cached: bool
    seconds: float
    metrics: dict = field(default_factory=dict)


def run_stage(store: Store, stage: Stage, cfg: BaseModel | None, inputs: dict[str, str],
              force: bool = False, reporter: Reporter | None = None, run_info: dict | None = None,
              identity: object = None, mapper: Callable[..., list] = sequential_map,
              resources: dict[str, Path] | None = None) -> Outcome:
    """Produce (or find) the artifact of `stage` for this config and these input refs.

    `identity` is what the stage reads from outside the store (a source's files by content, the
    release a warm start continues from): it joins the key so that a changed corpus reruns the
    stage. `resources` are such folders, handed to the stage as `ctx.resources`.
    """
    params = stage.params(cfg)
    if identity is not None:
        params = {**params, "identity": identity}
    ref = make_ref(stage.name, compute_key(stage.name, stage.version, params, inputs))
    started = time.monotonic()
    reporter = reporter or Reporter(stage.name)

    # An artifact is current only if each input still holds what it was built from: the key names
    # inputs by ref, and an input deleted and rebuilt with other bytes (training stopped by a time
    # budget, a forced rerun after a code change) keeps its ref but makes this artifact stale.
    input_artifacts = {name: store.require(r) for name, r in inputs.items()}
    input_digests = {name: a.manifest["digest"] for name, a in input_artifacts.items()}

    def current(artifact) -> bool:
        return artifact is not None and not force and artifact.manifest.get("input_digests") == input_digests

    existing = store.get(ref)
    if current(existing):
        return Outcome(stage.name, ref, True, time.monotonic() - started, existing.metrics)

    with store.lock(ref):
        # Another run may have finished this artifact while we waited for the lock.
        existing = store.get(ref)
        if current(existing):
            return Outcome(stage.name, ref, True, time.monotonic() - started, existing.metrics)
        if existing is not None and not force:
            reporter.log.info("an input was rebuilt with other content: rebuilding %s", ref)
        manifest = {"version": stage.version, "params": params, "inputs": inputs,
                    "input_digests": input_digests, "run": run_info or {}}
        with store.writer(ref, manifest) as out:
            ctx = StageContext(inputs={name: a.path for name, a in input_artifacts.items()}, out=out,
                               work=store.work_dir(ref), report=reporter, store_root=store.root, ref=ref,
                               map=mapper, resources=dict(resources or {}))
            metrics = stage.run(cfg, ctx) or {}
            manifest["metrics"] = metrics
    return Outcome(stage.name, ref, False, time.monotonic() - started, metrics)

