"""What every stage has in common: its contract, the store round-trip, and its Prefect task.

A stage is a plain function `run(cfg, ctx) -> metrics` over files: `cfg` is the stage's own
pydantic config section, `ctx.inputs` maps each upstream stage name to its artifact folder,
and everything written under `ctx.out` becomes the artifact. It knows nothing of Prefect; it
tells a person what it did through `ctx.report`: progress as it goes, and a report of tables
and markdown, kept in the artifact's manifest and shown as the stage's card when it runs inside a
flow (flows/prefect_stage.py, flows/cards.py).

`run_stage` wraps any stage with the store: compute the key, return at once when the artifact
is complete (a cache hit), else take the key's lock, run into a temporary folder and commit.
`stage_task` is the same call as a Prefect task whose final state is named "Cached" on a hit,
so the UI shows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard, TypeVar

from pydantic import BaseModel

from ember.storage.store import Artifact, Store, compute_key, make_ref

_T = TypeVar("_T")
_R = TypeVar("_R")

# What a stage returns and its manifest keeps: JSON-like numbers and counts, by name.
Metrics = dict[str, Any]
# One titled section of a stage's report: {"key", "title", "markdown"}.
ReportSection = dict[str, str]


class Reporter:
    """How stage logic reports to a person: progress while it works, and a report of titled
    sections (tables, markdown) kept with the artifact (its manifest's "report"), which the Prefect
    UI shows as the stage's one card. This base class logs; see PrefectReporter."""

    PROGRESS_EVERY_S = 5.0  # progress log lines, at most this often (and always at 100%)
    NOTIFY_EVERY_S = 0.1  # `_on_progress` (a live bar, the run's progress card): this often, and at 100%

    def __init__(self, stage: str):
        self.stage = stage
        self.log = logging.getLogger(f"ember.{stage}")
        self.sections: dict[str, ReportSection] = {}  # key -> {"title", "markdown"}
        self._last_progress = 0.0
        self._last_notice = 0.0
        self._unfinished: dict[str, float] = {}  # what -> total, for loops that have not reached it

    def progress(self, done: float, total: float, what: str = "") -> None:
        """Long loops call this often (the tokenizer trainer once per document): it returns at once
        unless NOTIFY_EVERY_S has passed; the log hears of it every PROGRESS_EVERY_S."""
        what = what or self.stage
        finished = done >= total
        if finished:
            self._unfinished.pop(what, None)
        else:
            self._unfinished[what] = total
        now = time.monotonic()
        if not finished and now - self._last_notice < self.NOTIFY_EVERY_S:
            return
        self._last_notice = now
        pct = min(100.0 * done / total, 100.0) if total else 100.0
        self._on_progress(pct, what, done, total)
        if not finished and now - self._last_progress < self.PROGRESS_EVERY_S:
            return
        self._last_progress = now
        # Marked, so that a terminal that draws a progress bar can leave the line out.
        self.log.info("%s %.0f%% (%s/%s)", what, pct, _fmt(done), _fmt(total), extra={"ember_progress": True})

    def finish(self) -> None:
        """The stage has ended well: every loop it reported on is done, whether or not its last
        step said so (dedup reports its phases as they start, not the end of the last)."""
        for what, total in list(self._unfinished.items()):
            self.progress(total, total, what)

    def table(self, key: str, rows: Sequence[Mapping[str, object]], description: str = "") -> None:
        self._section(key, description, markdown_table(rows))

    def markdown(self, key: str, text: str, description: str = "") -> None:
        self._section(key, description, text)

    def _section(self, key: str, title: str, text: str) -> None:
        # A later report under the same key (a table that grows as training goes) replaces the
        # earlier one in its place. Debug level: the report is the stage's card, not log noise.
        self.sections[key] = {"title": title, "markdown": text}
        self.log.debug("%s:\n%s", title or key, text)

    def report(self) -> list[ReportSection]:
        """The sections in the order they were first reported."""
        return [{"key": key, **section} for key, section in self.sections.items()]

    def _on_progress(self, pct: float, what: str, done: float, total: float) -> None:
        pass


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows of dicts as a Markdown table (the columns of all rows, in first-seen order)."""
    if not rows:
        return "(none)"
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: object) -> str:
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


class Mapper(Protocol):
    """`ctx.map(fn, items, name)`: runs `fn` on each item, a unit of work of its own, and returns
    the results in input order. `fn` is a module-level function or a partial of one, with plain
    (picklable) arguments, so that a unit can run in another process."""

    def __call__(self, fn: Callable[[_T], _R], items: list[_T], name: str = ...) -> list[_R]: ...


def sequential_map(fn: Callable[[_T], _R], items: list[_T], name: str = "") -> list[_R]:
    return [fn(item) for item in items]


def pool_map(workers: int) -> Mapper:
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

    def run(fn: Callable[[_T], _R], items: list[_T], name: str = "") -> list[_R]:
        if workers <= 1 or len(items) <= 1:
            return sequential_map(fn, items, name)
        with ProcessPoolExecutor(
            max_workers=min(workers, len(items)), mp_context=multiprocessing.get_context("forkserver")
        ) as pool:
            return list(pool.map(fn, items))

    return run


@dataclass
class StageContext:
    inputs: dict[str, Path]  # upstream stage name -> its (read-only) artifact folder
    out: Path  # temporary artifact folder: all of it is committed when `run` returns
    work: Path  # scratch for this key that survives a crash (checkpoints); deleted on commit
    report: Reporter
    store_root: Path | None = None  # for the one stage that writes outside artifacts (publish -> releases/)
    # The store it runs against, for a stage that reads more than its inputs (publish: the
    # manifests of everything its model was made from, for the card).
    store: Store | None = None
    ref: str = ""  # this artifact's ref, `stage/key`
    # How a stage runs its independent units of work (one per shard): `map(fn, items, name)`.
    # In order here; under Prefect each unit is a task run of its own, visible in the UI.
    map: Mapper = sequential_map
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
    # `run(cfg, ctx)`: `cfg` is an instance of the stage's own config class (or None for a stage
    # that has none); one list holds every stage, so that class cannot be named here.
    run: Callable[[Any, StageContext], Metrics]
    inputs: tuple[str, ...] = ()  # the stages whose artifacts it reads (ctx.inputs)
    # Config fields that do not change the output (e.g. a progress interval) stay out of the key.
    unkeyed: tuple[str, ...] = ()

    def params(self, cfg: BaseModel | None) -> dict[str, Any]:
        return cfg.model_dump(mode="json", exclude=set(self.unkeyed)) if cfg is not None else {}


@dataclass
class Outcome:
    stage: str
    ref: str
    cached: bool
    seconds: float
    metrics: Metrics = field(default_factory=dict)
    path: Path | None = None  # the artifact's folder
    # From its manifest: the run that made it (flow_run_id, flow_run_name), when, in how long, and
    # the report it gave then (so that a cache hit shows the same card as the run that did the work).
    made_by: dict[str, Any] = field(default_factory=dict)
    report: list[ReportSection] = field(default_factory=list)


def _outcome(stage: str, artifact: Artifact, cached: bool, seconds: float) -> Outcome:
    manifest = artifact.manifest
    made_by = {**manifest.get("run", {}), "created": manifest.get("created"), "seconds": manifest.get("seconds")}
    return Outcome(
        stage, artifact.ref, cached, seconds, artifact.metrics, artifact.path, made_by, manifest.get("report", [])
    )


def run_stage(
    store: Store,
    stage: Stage,
    cfg: BaseModel | None,
    inputs: dict[str, str],
    force: bool = False,
    reporter: Reporter | None = None,
    run_info: dict[str, str] | None = None,
    identity: object = None,
    mapper: Mapper = sequential_map,
    resources: dict[str, Path] | None = None,
) -> Outcome:
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

    def current(artifact: Artifact | None) -> TypeGuard[Artifact]:
        return artifact is not None and not force and artifact.manifest.get("input_digests") == input_digests

    existing = store.get(ref)
    if current(existing):
        return _outcome(stage.name, existing, True, time.monotonic() - started)

    with store.lock(ref):
        # Another run may have finished this artifact while we waited for the lock.
        existing = store.get(ref)
        if current(existing):
            return _outcome(stage.name, existing, True, time.monotonic() - started)
        if existing is not None and not force:
            reporter.log.info("an input was rebuilt with other content: rebuilding %s", ref)
        manifest = {
            "version": stage.version,
            "params": params,
            "inputs": inputs,
            "input_digests": input_digests,
            "run": run_info or {},
        }
        with store.writer(ref, manifest) as out:
            ctx = StageContext(
                inputs={name: a.path for name, a in input_artifacts.items()},
                out=out,
                work=store.work_dir(ref),
                report=reporter,
                store_root=store.root,
                store=store,
                ref=ref,
                map=mapper,
                resources=dict(resources or {}),
            )
            manifest["metrics"] = stage.run(cfg, ctx) or {}
            manifest["report"] = reporter.report()
    # The writer completed `manifest`: no need to read back what was just committed.
    return _outcome(stage.name, Artifact(ref, store.path(ref), manifest), False, time.monotonic() - started)
