"""The thin Prefect layer over `run_stage` (tasks/stage.py): one task that runs any stage against the store.

Stage logic stays Prefect-free; here its report becomes the stage's one Prefect artifact (a card,
flows/cards.py), its progress moves the run's progress artifact, and a store hit becomes a task
state named "Cached", which the UI shows.
Prefect's own result cache is off: the store is the cache, and it knows when an artifact was
deleted, which a Prefect cache record would not.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from uuid import UUID

import cloudpickle
from prefect import Task, task
from prefect.artifacts import create_markdown_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel

from ember.flows.cards import failed_card, position, stage_card
from ember.flows.relocate import Relocated, Stamps, folders_in, sync_down, sync_up
from ember.storage.objects import ObjectStore
from ember.storage.store import Store
from ember.tasks.stage import Mapper, Outcome, Reporter, Stage, run_stage

if TYPE_CHECKING:  # imported when a stage first maps on them
    from prefect.task_runners import ProcessPoolTaskRunner
    from prefect_dask.task_runners import DaskTaskRunner

_P = ParamSpec("_P")
_T = TypeVar("_T")
_R = TypeVar("_R")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


# Who else hears of progress in this process: `ember run`'s live bar in the terminal. Each gets
# (stage, what, done, total) on every report, from the stage's own thread or a worker thread.
PROGRESS_LISTENERS: list[Callable[[str, str, float, float], None]] = []


class PrefectReporter(Reporter):
    """Progress goes to the run's one progress artifact (and to PROGRESS_LISTENERS); the report is
    kept, and `stage_task` publishes it as the stage's card when the stage ends. It still logs (the
    `ember` logger reaches the run log)."""

    ARTIFACT_EVERY_S = 2.0  # progress artifact updates, at most this often (and always at 100%)

    def __init__(self, stage: str, progress_id: UUID | None = None, position: str = ""):
        super().__init__(stage)
        self.progress_id, self.position = progress_id, position
        self._last_update = 0.0
        # Stage logic may report from worker threads (tokenizers pulls its training iterator
        # from a Rust thread); Prefect finds its run through context variables, so calls from
        # another thread run inside a copy of the task's context, one at a time.
        self._thread = threading.get_ident()
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()

    def _in_task(self, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if threading.get_ident() == self._thread:
            return fn(*args, **kwargs)
        with self._lock:
            return self._context.run(fn, *args, **kwargs)

    def _on_progress(self, pct: float, what: str, done: float, total: float) -> None:
        for listener in PROGRESS_LISTENERS:
            listener(self.stage, what, done, total)
        now = time.monotonic()
        if self.progress_id is None or (pct < 100 and now - self._last_update < self.ARTIFACT_EVERY_S):
            return
        self._last_update = now
        self._in_task(
            update_progress_artifact,
            self.progress_id,
            progress=pct,
            description=f"Stage {self.position}: {what}, {pct:.0f}%",
        )


def unit_run_name(name: str, item: Any, index: int) -> str:
    """`name-<item>` for a unit's task run: a file's name for a path, the value for a short scalar,
    else the unit's position. Braces are doubled: Prefect formats the name with the parameters."""
    if isinstance(item, (str, Path)):
        label = Path(item).name or str(item)
    elif isinstance(item, (int, float)) and not isinstance(item, bool):
        label = str(item)
    else:
        label = str(index)
    return f"{name}-{label}"[:100].replace("{", "{{").replace("}", "}}")


def prefect_map(fn: Callable[[_T], _R], items: list[_T], name: str = "unit") -> list[_R]:
    """Each unit of a stage's work as a task run of its own (named `name-<item>`), one after the
    other: the units of a shard-parallel stage already use every core (encode_batch, MinHash)."""
    unit = task(name=name, cache_policy=NO_CACHE, persist_result=False)(fn)
    return [unit.with_options(task_run_name=unit_run_name(name, item, i))(item) for i, item in enumerate(items)]


def _call_unit(fn: Callable[[_T], _R], item: _T) -> _R:
    # Module-level, so a task runner in another process finds it by reference; `fn` itself is a
    # module-level function or a partial of one (the ctx.map contract).
    return fn(item)


class UnitMap:
    """The `ctx.map` of stages under Prefect, as the config's `runner` section says.

    sequential: `prefect_map`. processes: Prefect's ProcessPoolTaskRunner with `workers`
    processes. dask: prefect-dask's DaskTaskRunner on the cluster at `address`, else on a local
    cluster of `workers` single-threaded processes. Either way each unit is a task run of its own,
    at most `workers` are submitted at once (a cluster larger than that does not flood the API
    or the store's disk), and results come back in input order. The pool or cluster starts at a
    stage's first map and `stage_task` closes it when the stage ends, failed or not.
    """

    def __init__(
        self, kind: str = "sequential", workers: int = 2, address: str | None = None, store: Store | None = None
    ):
        if kind not in ("sequential", "processes", "dask"):
            raise ValueError(f"runner.kind: unknown kind {kind!r}")
        self.kind, self.workers, self.address = kind, workers, address
        self._runner: ProcessPoolTaskRunner | DaskTaskRunner | None = None
        # On Dask with the store on object storage, a worker may be another machine with a cache
        # of its own: units are relocated (flows/relocate.py), their folders staged in the bucket.
        self.store = store if kind == "dask" and isinstance(store, ObjectStore) else None
        self._staging: str | None = None
        self._sent: dict[str, Stamps] = {}

    def _started(self) -> ProcessPoolTaskRunner | DaskTaskRunner:
        if self._runner is None:
            runner: ProcessPoolTaskRunner | DaskTaskRunner
            if self.kind == "processes":
                from prefect.task_runners import ProcessPoolTaskRunner

                runner = ProcessPoolTaskRunner(max_workers=self.workers)
            else:
                from prefect_dask.task_runners import DaskTaskRunner

                runner = (
                    DaskTaskRunner(address=self.address)
                    if self.address
                    else DaskTaskRunner(
                        cluster_kwargs={
                            "n_workers": self.workers,
                            "threads_per_worker": 1,
                            "processes": True,
                            "dashboard_address": None,
                        }
                    )
                )
            self._runner = runner.__enter__()
        return self._runner

    def __getstate__(self) -> dict[str, Any]:
        # Prefect ships the stage task's context, parameters included, with each unit.
        return {**self.__dict__, "_runner": None}

    def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.__exit__(None, None, None)
        if self._staging is not None:
            staging, self._staging, self._sent = self._staging, None, {}
            assert self.store is not None  # only units relocated through a store are staged
            if self.store.fs.exists(staging):
                self.store.fs.rm(staging, recursive=True)

    def __call__(self, fn: Callable[[_T], _R], items: list[_T], name: str = "unit") -> list[_R]:
        # One unit gains nothing from another process.
        if self.kind == "sequential" or len(items) <= 1:
            return prefect_map(fn, items, name)
        try:
            cloudpickle.dumps(fn)
        except Exception as err:  # a closure over the stage's context breaks the ctx.map contract
            logging.getLogger("ember").warning(
                "%s: its units cannot go to other processes (%s: %s); running them here, one after the other",
                name,
                type(err).__name__,
                err,
            )
            return prefect_map(fn, items, name)
        runner = self._started()
        folders: set[str] = set()
        if self.store is not None:
            self._staging = staging = self._staging or self.store.remote_path("staging", secrets.token_hex(8))
            folders = folders_in(fn, items, str(self.store.root))
            sync_up(self.store, folders, staging, self._sent)
            fn = Relocated(fn, self.store.url, str(self.store.root), staging)
        unit: Task[[Callable[[_T], _R], _T], _R] = task(name=name, cache_policy=NO_CACHE, persist_result=False)(
            _call_unit
        )
        results: list[_R] = []
        in_flight: deque[PrefectFuture[_R]] = deque()
        for i, item in enumerate(items):
            if len(in_flight) >= self.workers:
                results.append(in_flight.popleft().result())
            in_flight.append(
                runner.submit(unit.with_options(task_run_name=unit_run_name(name, item, i)), {"fn": fn, "item": item})
            )
        results.extend(future.result() for future in in_flight)
        if self.store is not None:
            sync_down(self.store, folders, staging, self._sent)
        return results


def _task_run_name() -> str:
    from prefect.runtime import task_run

    stage: Stage = task_run.parameters["stage"]
    return stage.name


def ui_url() -> str | None:
    """The UI of the server this process talks to; None under a temporary server nobody can open."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    return PREFECT_UI_URL.value() if PREFECT_API_URL.value() else None


@task(task_run_name=_task_run_name, cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    store: Store,
    stage: Stage,
    cfg: BaseModel | None,
    inputs: dict[str, str],
    force: bool = False,
    identity: object = None,
    artifact_prefix: str = "ember",
    mapper: Mapper = prefect_map,
    resources: dict[str, Path] | None = None,
    stages: list[str] | None = None,
    progress_id: UUID | None = None,
) -> Outcome | State[Outcome]:
    """Run one stage through the store. Returns an `Outcome`; a hit ends in state "Cached".

    `mapper` runs the stage's units (`prefect_map`, or a `UnitMap` from the config's runner);
    `stages` is the pipeline's order (for "stage 3 of 10"); `progress_id` is the run's progress
    artifact. Either way, hit or not, the stage publishes one card: what it did, then its report.
    """
    stages = stages or [stage.name]
    where = position(stage.name, stages) if stage.name in stages else "?"
    if progress_id is not None:
        update_progress_artifact(progress_id, progress=0.0, description=f"Stage {where}: {stage.name}")
    reporter = PrefectReporter(stage.name, progress_id, where)
    run_info = {"flow_run_id": str(flow_run.id or ""), "flow_run_name": flow_run.name or ""}
    try:
        outcome: Outcome = run_stage(
            store,
            stage,
            cfg,
            inputs,
            force=force,
            reporter=reporter,
            run_info=run_info,
            identity=identity,
            mapper=mapper,
            resources=resources,
        )
    except Exception as err:
        description, markdown = failed_card(stage.name, err, reporter.report(), stages)
        create_markdown_artifact(
            markdown=markdown, key=artifact_key(artifact_prefix, stage.name), description=description
        )
        raise
    finally:
        if isinstance(mapper, UnitMap):
            mapper.close()
    reporter.finish()
    if progress_id is not None:
        update_progress_artifact(
            progress_id,
            progress=100.0,
            description=f"Stage {where}: {stage.name}, " + ("cached" if outcome.cached else "done"),
        )
    description, markdown = stage_card(outcome, stages, ui_url())
    create_markdown_artifact(markdown=markdown, key=artifact_key(artifact_prefix, stage.name), description=description)
    if outcome.cached:
        reporter.log.info("cache hit: %s", outcome.ref)
        return Completed(name="Cached", message=f"store hit {outcome.ref}", data=outcome)
    return outcome
