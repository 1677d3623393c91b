"""One serve process with all of Ember's deployments for one config, against a Prefect server.

    make server                                   # or: prefect server start --host 127.0.0.1
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m ember.deployments.serve configs/sample.yaml
    prefect deployment run 'build-llm/build'

Deployments (each runs in a subprocess of this one):

- `build-llm/build`: the pipeline, on demand (runs named `build-<config>-<digest>`). Its
  parameters are the typed config loaded from the YAML file, so the UI shows every field and
  `--param`/`--params` are validated at creation.
- `build-llm/retrain`: the same flow (runs named `retrain-<config>-<digest>`) with
  `train.warm_start` on and publishing left to the gate, on the config's `schedule` (nightly by
  default) and whenever the watcher reports that the sources changed (a DeploymentEventTrigger on
  `ember.corpus.changed`). Unchanged stages are cache hits.
- `ember-demo/demo`: the Gradio demo on `releases/latest`, serving until its run is cancelled; a
  new release shows up at the next generation without a restart. It has no deployment
  concurrency limit: such a limit holds a lease that the run must renew every 225 s, and a
  server restart forgets it (the default lease storage is in memory), so the next renewal
  fails and Prefect crashes the run (`flow_engine.py` keeps deployment leases with
  `raise_on_lease_renewal_failure=True`, no setting). The port is the demo's lock instead: a
  run whose port is taken fails at once and names the demo run serving there. The run also
  watches its own state, so cancelling it works after a server restart too (see `demo`).

The serve process also looks at the sources every `schedule.watch_seconds` (a thread running
`ember.flows.watch.watch_sources`) and emits `ember.corpus.changed` when they differ: no flow run
when nothing changed.

`build` and `retrain` each allow one run at a time (others wait their turn); the store's
per-artifact locks make any two runs that do overlap (a build and a retrain, two `ember run`s)
safe: one writes an artifact, the other waits and reuses it.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import cast
from uuid import UUID

from prefect import flow, get_client, get_run_logger, serve
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, State, StateType
from prefect.context import FlowRunContext
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled
from prefect.types.entrypoint import EntrypointType

import ember.flows  # noqa: F401  (offline defaults before Prefect loads)
from ember.flows.config import ConfigError, PipelineConfig, load_config
from ember.flows.pipeline import DEMO_URL, build_llm, retrain_config
from ember.flows.watch import EVENT, resource_id, watch_sources
from ember.storage.objects import open_store
from ember.storage.store import default_root

DEMO_PORT = int(DEMO_URL.rsplit(":", 1)[1])

# Run by module path (`ember.flows.pipeline.build_llm`), not by file: works from any directory.
ENTRYPOINT = EntrypointType.MODULE_PATH


# How a demo run looks at its own state (see `until_stopped`).
STATE_CHECK_SECONDS = 3.0
CANCEL_GRACE_SECONDS = 20.0  # the serve process stops a cancelled run within a few seconds
GONE_CHECKS = 3  # a run the server no longer knows, so many checks in a row: nobody can cancel it


class PortTaken(RuntimeError):
    """The demo's port is in use: one demo per port."""


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on host:port (Gradio's own test: bind with SO_REUSEADDR, so a
    port a stopped demo left in TIME_WAIT counts as free)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def demo_serving(port: int, other_than: UUID | None) -> str | None:
    """`'name' (id)` of a Running demo run on `port`, other than `other_than`, if the API says."""
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[demo.name])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                ),
            )
    except Exception:  # only for the message
        return None
    for run in runs:
        if run.id != other_than and int(run.parameters.get("port", DEMO_PORT)) == port:
            return f"'{run.name}' ({run.id})"
    return None


def until_stopped(
    flow_run_id: UUID,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    every: float = STATE_CHECK_SECONDS,
    grace: float = CANCEL_GRACE_SECONDS,
) -> str:
    """Block while the run is meant to go on; return why it is not any more.

    Normally the serve process stops a cancelled run itself (it kills this process within
    seconds, the run ends Cancelled) and this never returns. But Prefect's runner stops
    watching for cancellations for good once a few of its polls failed (about 3 polling
    intervals of a server outage; it logs "Cancellation polling task failed ... flow run
    cancellation will fail"), so after a server restart only the run itself notices: when it
    has been Cancelling for `grace` seconds, or is in a final state, or the server no longer
    knows it. While the API is unreachable the demo keeps serving."""
    cancelling_since = None
    unreachable = False
    gone = 0
    with get_client(sync_client=True) as client:
        while True:
            time.sleep(every)
            try:
                state = client.read_flow_run(flow_run_id).state
            except ObjectNotFound:
                gone += 1
                if gone >= GONE_CHECKS:
                    return "the Prefect server no longer knows this run"
                continue
            except Exception as err:  # the server is down or restarting
                if not unreachable:
                    logger.warning("The Prefect API is unreachable (%s); the demo keeps serving", err)
                unreachable = True
                continue
            gone = 0
            if unreachable:
                logger.info("The Prefect API answers again")
                unreachable = False
            if state is None:
                continue
            if state.is_final():
                return f"the run is {state.name}"
            if state.type == StateType.CANCELLING:
                cancelling_since = cancelling_since or time.monotonic()
                if time.monotonic() - cancelling_since >= grace:
                    return "the run was cancelled and the serve process did not stop it"
            else:
                cancelling_since = None


@flow(name="ember-demo", persist_result=False)
def demo(
    store_root: str | None = None, release: str = "latest", host: str = "127.0.0.1", port: int = DEMO_PORT
) -> State:
    """Serve the Gradio demo on a release until the run is cancelled.

    One demo per port: if the port is taken the run fails at once, naming the demo run that
    serves there, and starts no second server. Cancelling the run stops the demo and frees the
    port, through the serve process or, when that lost track of cancellations during a server
    outage, through the run itself (`until_stopped`); the run ends Cancelled either way.
    `store_root` is a folder or URL (default: $EMBER_HOME, else .ember/ where the worker runs);
    an object store's releases are fetched, and followed while the demo serves."""
    from ember.deployments.app import launch

    logger = get_run_logger()
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None  # a flow's body runs in its flow run
    flow_run_id = context.flow_run.id
    if port_taken(host, port):
        owner = demo_serving(port, other_than=flow_run_id)
        raise PortTaken(
            f"port {port} on {host} is taken{' by the demo run ' + owner if owner else ''}: "
            f"one demo per port. Cancel that run first (prefect flow-run cancel ID) "
            f"or start this one on another port (--param port=N)"
        )
    store = open_store(store_root or default_root())
    logger.info("demo of %s/releases/%s at http://%s:%d", store.location, release, host, port)
    releases = store.sync_releases()
    store.follow_releases()
    app = launch(releases, release=release, host=host, port=port, prevent_thread_lock=True)
    try:
        why = until_stopped(flow_run_id, logger)
    except KeyboardInterrupt:  # Ctrl-C in the terminal of the serve process reaches its runs too
        why = "interrupted"
    finally:
        app.close(verbose=False)
    logger.info("Demo on port %d stopped: %s", port, why)
    return Cancelled(message=f"Demo stopped: {why}")


def build_deployment(config: PipelineConfig) -> RunnerDeployment:
    deployment = build_llm.to_deployment(
        name="build",
        parameters={"config": config.model_dump(mode="json")},
        description=f"Build a model from {config.name}'s sources (manual runs)",
        tags=["ember", config.name],
        concurrency_limit=1,
        entrypoint_type=ENTRYPOINT,
    )
    # Prefect types it "or a coroutine of one", for async callers; called from sync code, it is the deployment.
    return cast(RunnerDeployment, deployment)


def retrain_deployment(config: PipelineConfig) -> RunnerDeployment:
    schedule = config.schedule
    schedules = []
    if schedule.cron:
        schedules.append(Cron(schedule.cron, timezone=schedule.timezone))
    if schedule.interval_seconds:
        schedules.append(Interval(timedelta(seconds=schedule.interval_seconds)))
    deployment = build_llm.to_deployment(
        name="retrain",
        parameters={"config": retrain_config(config).model_dump(mode="json"), "purpose": "retrain"},
        schedules=schedules,
        triggers=[
            DeploymentEventTrigger(
                name=f"retrain {config.name} when its corpus changes",
                expect={EVENT},
                match={"prefect.resource.id": resource_id(config.name)},
            )
        ],
        description=(
            f"Retrain {config.name} on its schedule and when its sources change: warm start, "
            "cached stages reused, published only through the gate"
        ),
        tags=["ember", config.name, "retrain"],
        # A retrain that fires while another runs waits for it, then finds its work in the store.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        entrypoint_type=ENTRYPOINT,
    )
    return cast(RunnerDeployment, deployment)  # sync: see build_deployment


def demo_deployment(config: PipelineConfig) -> RunnerDeployment:
    deployment = demo.to_deployment(
        name="demo",
        parameters={"store_root": str(config.store_root())},
        description="The Gradio demo on releases/latest; cancel the run to stop it",
        tags=["ember", config.name],
        # No concurrency limit: its lease would not survive a server restart (see the module's
        # docstring). The demo's port guards "one demo per port" instead (see `demo`).
        entrypoint_type=ENTRYPOINT,
    )
    return cast(RunnerDeployment, deployment)  # sync: see build_deployment


def deployments(config: PipelineConfig) -> list[RunnerDeployment]:
    config = config.pinned()  # runs start in subprocesses of this one
    return [build_deployment(config), retrain_deployment(config), demo_deployment(config)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ember.deployments.serve", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/sample.yaml", help="pipeline YAML")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if not PREFECT_API_URL.value():
        # Without a server, Prefect would serve against a temporary one that nobody else can see.
        sys.exit(
            "error: PREFECT_API_URL is not set. Start a server (`make server`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    stop = threading.Event()
    if config.schedule.watch_seconds:
        threading.Thread(
            target=watch_sources,
            args=(config.pinned(), config.schedule.watch_seconds, stop),
            name="ember-watch",
            daemon=True,
        ).start()
    try:
        serve(*deployments(config))
    finally:
        stop.set()


if __name__ == "__main__":
    # Through the module's real name: a flow defined in `__main__` could not be found by the
    # run's subprocess (its entrypoint is `ember.deployments.serve.demo`).
    from ember.deployments.serve import main as serve_main

    serve_main()
