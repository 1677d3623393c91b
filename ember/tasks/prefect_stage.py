"""The thin Prefect layer over `run_stage`: one task that runs any stage against the store.

Stage logic stays Prefect-free; here its reports become Prefect artifacts (tables, markdown,
a progress bar) and a store hit becomes a task state named "Cached", which the UI shows.
Prefect's own result cache is off: the store is the cache, and it knows when an artifact was
deleted, which a Prefect cache record would not.
"""

from __future__ import annotations

import contextvars
import re
import threading

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel

from ember.storage.store import Store
from ember.tasks.stage import Outcome, Reporter, Stage, run_stage


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class PrefectReporter(Reporter):
    """Reports as Prefect artifacts, and still logs (the `ember` logger reaches the run log)."""

    def __init__(self, stage: str, prefix: str):
        super().__init__(stage)
        self.prefix = prefix
        self._progress_id = None
        # Stage logic may report from worker threads (tokenizers pulls its training iterator
        # from a Rust thread); Prefect finds its run through context variables, so calls from
        # another thread run inside a copy of the task's context, one at a time.
        self._thread = threading.get_ident()
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()

    def _in_task(self, fn, *args, **kwargs):
        if threading.get_ident() == self._thread:
            return fn(*args, **kwargs)
        with self._lock:
            return self._context.run(fn, *args, **kwargs)

    def table(self, key: str, rows: list[dict], description: str = "") -> None:
        super().table(key, rows, description)
        self._in_task(create_table_artifact, table=rows, key=artifact_key(self.prefix, key),
                      description=description or key)

    def markdown(self, key: str, text: str, description: str = "") -> None:
        super().markdown(key, text, description)
        self._in_task(create_markdown_artifact, markdown=text, key=artifact_key(self.prefix, key),
                      description=description or key)

    def _on_progress(self, pct: float) -> None:
        if self._progress_id is None:
            self._progress_id = self._in_task(create_progress_artifact, progress=pct,
                                              description=f"{self.stage} progress")
        else:
            self._in_task(update_progress_artifact, self._progress_id, progress=pct)


def prefect_map(fn, items: list, name: str = "unit") -> list:
    """Each unit of a stage's work as a task run of its own (named `name-<item>`), one after the
    other: the units of a shard-parallel stage already use every core (encode_batch, MinHash)."""
    unit = task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)
    return [unit.with_options(task_run_name=f"{name}-{item}")(item) for item in items]


def _task_run_name() -> str:
    from prefect.runtime import task_run

    return task_run.parameters["stage"].name


@task(task_run_name=_task_run_name, cache_policy=NO_CACHE, persist_result=False)
def stage_task(store: Store, stage: Stage, cfg: BaseModel | None, inputs: dict[str, str],
               force: bool = False, identity: object = None, artifact_prefix: str = "ember"):
    """Run one stage through the store. Returns an `Outcome`; a hit ends in state "Cached"."""
    reporter = PrefectReporter(stage.name, artifact_key(artifact_prefix, stage.name))
    run_info = {"flow_run_id": str(flow_run.id or ""), "flow_run_name": flow_run.name or ""}
    outcome: Outcome = run_stage(store, stage, cfg, inputs, force=force, reporter=reporter,
                                 run_info=run_info, identity=identity, mapper=prefect_map)
    if outcome.cached:
        reporter.log.info("cache hit: %s", outcome.ref)
        return Completed(name="Cached", message=f"store hit {outcome.ref}", data=outcome)
    return outcome
