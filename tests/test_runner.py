"""The `runner` section: a stage's units under a process pool or on a Dask cluster give the same
bytes as one after the other, and each unit is still a task run of its own."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from prefect import flow

from ember.flows.config import PipelineConfig
from ember.flows.prefect_stage import UnitMap, stage_task
from ember.storage.objects import ObjectStore, open_store
from ember.tasks import dedup, download, normalize, tokenize, train_tokenizer
from ember.tasks import filter as quality_filter
from ember.tasks.stage import Outcome
from pipeline_configs import settled_task_runs, write_config

pytestmark = pytest.mark.slow

DATA_STAGES = ["download", "normalize", "filter", "dedup", "train_tokenizer", "tokenize"]


@flow(name="ember-data-stages", persist_result=False)
def data_stages(config: PipelineConfig, store_root: str) -> dict[str, str]:
    """The pipeline's data stages, wired like `build_llm` (the same stage_task and mapper)."""
    store = open_store(store_root)
    mapper = UnitMap(config.runner.kind, config.runner.workers, config.runner.address, store=store)
    refs: dict[str, str] = {}

    def run(stage, cfg, inputs, identity=None):
        outcome = stage_task(
            store,
            stage,
            cfg,
            {name: refs[name] for name in inputs},
            identity=identity,
            artifact_prefix=config.name,
            mapper=mapper,
        )
        assert isinstance(outcome, Outcome)  # a direct call returns the result, cached or not
        refs[stage.name] = outcome.ref

    run(download.STAGE, config.download, [], identity=download.preflight(config.download))
    run(normalize.STAGE, config.normalize, ["download"])
    run(quality_filter.STAGE, config.filter, ["normalize"])
    run(dedup.STAGE, config.dedup, ["filter"])
    run(train_tokenizer.STAGE, config.train_tokenizer, ["dedup"])
    run(tokenize.STAGE, config.tokenize, ["dedup", "train_tokenizer"])
    return refs


def unit_task_runs(flow_run_id) -> list[str]:
    """Names of the task runs of a flow run that are units (not the stages themselves)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = settled_task_runs(client, flow_run_id)
    assert all(run.state is not None and run.state.is_completed() for run in runs), [
        (run.name, run.state and run.state.name) for run in runs
    ]
    return [run.name for run in runs if run.name not in DATA_STAGES]


@pytest.fixture(scope="module")
def small_shards():
    """Download writes one shard per 16 M characters; 80 K here, so that every later stage has
    several units to spread (normalize and filter per shard, dedup per row range, tokenize per shard)."""
    from ember.storage import shards
    from ember.tasks.download import stage as download_stage  # where `run` looks ShardWriter up

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(download_stage, "ShardWriter", functools.partial(shards.ShardWriter, max_chars=80_000))
        yield


@pytest.fixture(scope="module")
def dask_cluster():
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpora):
    """320 KB of TinyStories as four files: a few shards, seconds per run."""
    folder = tmp_path_factory.mktemp("runner-src")
    text = (corpora / "tinystories_sample" / "tinystories_valid_head.txt").read_text(encoding="utf-8")[:320_000]
    for i in range(4):
        (folder / f"part{i}.txt").write_text(text[i * 80_000 : (i + 1) * 80_000], encoding="utf-8")
    return folder


def run_data_stages(tmp_path: Path, source: Path, name: str, runner: dict, store: str | None = None):
    from ember.flows.config import load_config

    config = load_config(
        write_config(
            tmp_path,
            f"{name}.yaml",
            runner=runner,
            dedup={"unit_chars": 50_000},
            download={"sources": [{"name": "plays", "path": str(source)}]},
        )
    )
    store = store or str(tmp_path / name)
    state = data_stages(config, store, return_state=True)
    refs = state.result()
    digests = {stage: file_digests(open_store(store).require(ref).manifest) for stage, ref in refs.items()}
    return digests, unit_task_runs(state.state_details.flow_run_id)


def file_digests(manifest: dict) -> dict[str, str]:
    """Each file's sha256, less train_tokenizer's report.*: they say how long training took."""
    return {
        name: entry["sha256"]
        for name, entry in manifest["files"].items()
        if not (manifest["stage"] == "train_tokenizer" and name.startswith("report."))
    }


def test_processes_and_dask_give_the_sequential_bytes(prefect_api, small_shards, source, dask_cluster, tmp_path):
    sequential, units = run_data_stages(tmp_path, source, "sequential", {"kind": "sequential"})
    assert list(sequential) == DATA_STAGES
    # Each shard of tokenize is a unit, whatever the other stages map today.
    assert len([unit for unit in units if unit.startswith("tokenize-shard")]) >= 2, units

    transitions = dask_cluster.scheduler.transition_counter
    on_dask, dask_units = run_data_stages(
        tmp_path, source, "dask", {"kind": "dask", "workers": 2, "address": dask_cluster.scheduler_address}
    )
    assert on_dask == sequential
    assert sorted(dask_units) == sorted(units)
    # The units went through the cluster's scheduler (a task takes several transitions); tokenize's
    # close over the stage's context, so they stay in the run's process (with a warning).
    shipped = [unit for unit in units if not unit.startswith("tokenize-")]
    assert len(shipped) >= 4
    assert dask_cluster.scheduler.transition_counter - transitions >= 2 * len(shipped)

    in_processes, process_units = run_data_stages(tmp_path, source, "processes", {"kind": "processes", "workers": 2})
    assert in_processes == sequential
    assert sorted(process_units) == sorted(units)


def test_runner_config_is_checked():
    from ember.flows.config import ConfigError, parse_config

    download = {"sources": [{"path": "/"}]}
    with pytest.raises(ConfigError, match="runner.kind"):
        parse_config({"download": download, "runner": {"kind": "threads"}})
    with pytest.raises(ConfigError, match="address is for kind dask"):
        parse_config({"download": download, "runner": {"kind": "processes", "address": "tcp://127.0.0.1:8786"}})
    with pytest.raises(ConfigError, match="schedule.cron"):
        parse_config({"download": download, "schedule": {"cron": "every night"}})
    with pytest.raises(ConfigError, match="schedule.timezone: .*unknown time zone"):
        parse_config({"download": download, "schedule": {"timezone": "Mars/Olympus"}})


def test_dask_workers_that_share_only_the_bucket_give_the_sequential_bytes(
    prefect_api, small_shards, source, s3, tmp_path, monkeypatch
):
    """A Dask scheduler and two workers in folders of their own, the store in the SeaweedFS bucket:
    the units fetch their inputs by ref into each worker's cache and stage what they write in the
    bucket (flows/relocate.py); the artifacts are the sequential run's, byte for byte."""
    import os
    import subprocess
    import sys

    from distributed import Client

    from object_server import free_ports
    from test_prefect_server import stop

    sequential, _ = run_data_stages(tmp_path, source, "sequential", {"kind": "sequential"})
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "flow-cache"))  # the flow's machine
    (port,) = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    dask = Path(sys.executable).parent / "dask"
    procs = [
        subprocess.Popen(
            [str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            cwd=tmp_path,
            stdout=(tmp_path / "scheduler.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    machines = []
    try:
        for name in ("a", "b"):
            folder = tmp_path / f"machine-{name}"
            folder.mkdir()
            env = {**os.environ, **s3.env, "EMBER_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
            procs.append(
                subprocess.Popen(
                    [
                        str(dask),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--local-directory",
                        str(folder / "dask"),
                        "--name",
                        f"worker-{name}",
                    ],
                    cwd=folder,
                    env=env,
                    stdout=(folder / "worker.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            machines.append(folder)
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        url = f"s3://ember/{tmp_path.name}"
        on_dask, _ = run_data_stages(
            tmp_path, source, "dask-bucket", {"kind": "dask", "workers": 2, "address": address}, store=url
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
    assert on_dask == sequential
    # The workers read their inputs from the bucket, each into its own cache, and worked there.
    for folder in machines:
        (cache,) = (folder / "cache").iterdir()
        assert list((cache / "artifacts").glob("*/*/manifest.json")), folder
        assert list((cache / "tmp").iterdir()) or list((cache / "work").iterdir())
    store = open_store(url)  # the staged folders went with their stage (an empty folder may stay)
    assert isinstance(store, ObjectStore)
    staging = store.remote_path("staging")
    assert [path for path in store.fs.find(staging) if path.rstrip("/") != staging] == []
