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
  new release shows up at the next generation without a restart.

The serve process also looks at the sources every `schedule.watch_seconds` (a thread running
`ember.flows.watch.watch_sources`) and emits `ember.corpus.changed` when they differ: no flow run
when nothing changed.

`build` and `retrain` each allow one run at a time (others wait their turn); the store's
per-artifact locks make any two runs that do overlap (a build and a retrain, two `ember run`s)
safe: one writes an artifact, the other waits and reuses it.
"""

from __future__ import annotations

import argparse
import sys
import threading
from datetime import timedelta
from pathlib import Path

import ember.flows  # noqa: F401  (offline defaults before Prefect loads)
from prefect import flow, get_run_logger, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL

from ember.flows.config import ConfigError, PipelineConfig, load_config
from ember.flows.pipeline import DEMO_URL, build_llm, retrain_config
from ember.flows.watch import EVENT, resource_id, watch_sources

DEMO_PORT = int(DEMO_URL.rsplit(":", 1)[1])

# Run by module path (`ember.flows.pipeline.build_llm`), not by file: works from any directory.
_COMMON = {"entrypoint_type": EntrypointType.MODULE_PATH}


@flow(name="ember-demo", persist_result=False)
def demo(store_root: str, release: str = "latest", host: str = "127.0.0.1", port: int = DEMO_PORT) -> None:
    """Serve the Gradio demo on a release until the run is cancelled."""
    from ember.deployments.app import launch

    get_run_logger().info("demo of %s/releases/%s at http://%s:%d", store_root, release, host, port)
    launch(Path(store_root) / "releases", release=release, host=host, port=port)


def build_deployment(config: PipelineConfig) -> RunnerDeployment:
    return build_llm.to_deployment(
        name="build",
        parameters={"config": config.model_dump(mode="json")},
        description=f"Build a model from {config.name}'s sources (manual runs)",
        tags=["ember", config.name],
        concurrency_limit=1,
        **_COMMON,
    )


def retrain_deployment(config: PipelineConfig) -> RunnerDeployment:
    schedule = config.schedule
    schedules = []
    if schedule.cron:
        schedules.append(Cron(schedule.cron, timezone=schedule.timezone))
    if schedule.interval_seconds:
        schedules.append(Interval(timedelta(seconds=schedule.interval_seconds)))
    return build_llm.to_deployment(
        name="retrain",
        parameters={"config": retrain_config(config).model_dump(mode="json"), "purpose": "retrain"},
        schedules=schedules,
        triggers=[DeploymentEventTrigger(
            name=f"retrain {config.name} when its corpus changes",
            expect={EVENT},
            match={"prefect.resource.id": resource_id(config.name)},
        )],
        description=(f"Retrain {config.name} on its schedule and when its sources change: warm start, "
                     "cached stages reused, published only through the gate"),
        tags=["ember", config.name, "retrain"],
        # A retrain that fires while another runs waits for it, then finds its work in the store.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        **_COMMON,
    )


def demo_deployment(config: PipelineConfig) -> RunnerDeployment:
    return demo.to_deployment(
        name="demo",
        parameters={"store_root": str(config.store_root())},
        description="The Gradio demo on releases/latest; cancel the run to stop it",
        tags=["ember", config.name],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        **_COMMON,
    )


def pinned(config: PipelineConfig) -> PipelineConfig:
    """Runs start in subprocesses of this one: pin the store to the folder it resolves to here
    ($EMBER_HOME, the config's `store.root`, or .ember/ in this directory)."""
    return config.model_copy(update={"store": config.store.model_copy(update={"root": str(config.store_root())})})


def deployments(config: PipelineConfig) -> list[RunnerDeployment]:
    config = pinned(config)
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
        sys.exit("error: PREFECT_API_URL is not set. Start a server (`make server`) and "
                 "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    stop = threading.Event()
    if config.schedule.watch_seconds:
        threading.Thread(target=watch_sources, args=(pinned(config), config.schedule.watch_seconds, stop),
                         name="ember-watch", daemon=True).start()
    try:
        serve(*deployments(config))
    finally:
        stop.set()


if __name__ == "__main__":
    # Through the module's real name: a flow defined in `__main__` could not be found by the
    # run's subprocess (its entrypoint is `ember.deployments.serve.demo`).
    from ember.deployments.serve import main as serve_main

    serve_main()
