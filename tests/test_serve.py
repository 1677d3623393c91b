"""The deployments of the serve process, and the corpus watcher behind the retrain trigger."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deployments():
    from ember.deployments.serve import deployments
    from ember.flows.config import load_config

    return {d.name: d for d in deployments(load_config(REPO / "configs" / "sample.yaml"))}


def test_build_deployment_parameters_are_the_typed_config(deployments):
    deployment = deployments["build"]
    assert deployment.flow_name == "build-llm"
    config = deployment.parameters["config"]
    assert config["name"] == "sample"
    assert config["download"]["sources"][0]["path"].endswith("gutenberg_en")
    # Runs start in subprocesses: the store is pinned to an absolute folder.
    assert Path(config["store"]["root"]).is_absolute()
    schema = deployment._parameter_openapi_schema.model_dump()
    assert "config" in schema["required"]
    pipeline = schema["definitions"]["PipelineConfig"]
    assert {"download", "filter", "train", "publish", "schedule", "runner"} <= set(pipeline["properties"])
    assert pipeline.get("additionalProperties") is False
    assert deployment.concurrency_limit == 1 and deployment.schedules == []


def test_retrain_runs_nightly_and_on_corpus_change_with_warm_start_through_the_gate(deployments):
    retrain = deployments["retrain"]
    config = retrain.parameters["config"]
    assert config["train"]["warm_start"] is True and config["publish"]["force"] is False
    # Otherwise the build's config: the same stage settings, so unchanged stages are cache hits.
    build = deployments["build"].parameters["config"]
    assert {k: v for k, v in config.items() if k != "train"} == {k: v for k, v in build.items() if k != "train"}
    assert {**config["train"], "warm_start": False} == build["train"]
    (schedule,) = retrain.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    (trigger,) = retrain.triggers
    assert trigger.expect == {"ember.corpus.changed"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "ember.config.sample"}
    assert retrain.concurrency_limit == 1 and retrain.concurrency_options.collision_strategy.value == "ENQUEUE"


def test_deployments_are_build_retrain_and_demo(deployments):
    # The watcher is a thread of the serve process, not a deployment: no flow run every interval.
    assert sorted(deployments) == ["build", "demo", "retrain"]
    assert deployments["build"].parameters.get("purpose", "build") == "build"
    assert deployments["retrain"].parameters["purpose"] == "retrain"
    demo = deployments["demo"]
    assert demo.flow_name == "ember-demo" and Path(demo.parameters["store_root"]).is_absolute()
    assert demo.entrypoint == "ember.deployments.serve.demo"


def test_schedule_section_changes_the_deployments(tmp_path):
    from prefect.client.schemas.schedules import IntervalSchedule

    from ember.deployments.serve import deployments
    from ember.flows.config import load_config

    config = load_config(REPO / "configs" / "sample.yaml")
    config = config.model_copy(
        update={
            "schedule": config.schedule.model_copy(
                update={"cron": None, "interval_seconds": 30.0, "watch_seconds": None}
            )
        }
    )
    found = {d.name: d for d in deployments(config)}
    schedules = found["retrain"].schedules
    assert schedules is not None
    (schedule,) = schedules
    assert isinstance(schedule.schedule, IntervalSchedule) and schedule.schedule.interval == timedelta(seconds=30)


def test_serve_refuses_to_start_without_a_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ember.deployments.serve import main

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(SystemExit) as exit_info:
        main([str(REPO / "configs" / "sample.yaml")])
    assert "PREFECT_API_URL is not set" in str(exit_info.value)


@pytest.mark.slow
def test_watcher_reports_a_change_once(prefect_api, tmp_path, corpora):
    from ember.flows.config import parse_config
    from ember.flows.watch import check_sources, seen_path

    source = tmp_path / "texts"
    source.mkdir()
    text = (corpora / "tinystories_sample" / "tinystories_valid_head.txt").read_text(encoding="utf-8")
    (source / "a.txt").write_text(text[:5000], encoding="utf-8")
    config = parse_config({"name": "w", "download": {"sources": [{"path": str(source)}]}})
    store = tmp_path / "store"

    assert check_sources(config, str(store))["changed"] is False  # the first look records
    first = json.loads(seen_path(store, "w").read_text())["digest"]
    assert check_sources(config, str(store))["changed"] is False
    (source / "b.txt").write_text(text[5000:8000], encoding="utf-8")
    assert check_sources(config, str(store))["changed"] is True
    assert json.loads(seen_path(store, "w").read_text())["digest"] != first
    assert check_sources(config, str(store))["changed"] is False


def test_the_watch_loop_outlives_a_failed_look(tmp_path, corpora, caplog):
    import threading
    import time

    from ember.flows.config import parse_config
    from ember.flows.watch import seen_path, watch_sources

    source = tmp_path / "texts"
    source.mkdir()
    (source / "a.txt").write_text("Some text to look at.\n", encoding="utf-8")
    config = parse_config({"name": "w", "download": {"sources": [{"path": str(source)}]}})
    (source / "a.txt").unlink()  # gone for a moment: the check fails
    stop = threading.Event()
    watcher = threading.Thread(target=watch_sources, args=(config, 0.05, stop, str(tmp_path / "store")))
    with caplog.at_level("INFO", logger="ember.watch"):
        watcher.start()
        deadline = time.monotonic() + 10
        while "checking w's sources failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        (source / "a.txt").write_text("Some text to look at.\n", encoding="utf-8")
        while not seen_path(tmp_path / "store", "w").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        watcher.join(timeout=5)
    assert "checking w's sources failed" in caplog.text
    assert seen_path(tmp_path / "store", "w").is_file() and not watcher.is_alive()


def test_ember_watch_runs_the_watcher_until_interrupted(tmp_path, corpora):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline_configs import write_config

    source = tmp_path / "texts"
    source.mkdir()
    (source / "a.txt").write_text("Some text to look at.\n", encoding="utf-8")
    config = write_config(tmp_path, download={"sources": [{"path": str(source)}]}, store={"root": str(tmp_path / "s")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.flows.cli", "watch", str(config), "--every", "0.2"],
        cwd=tmp_path,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "ph")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = tmp_path / "s" / "watch" / "tiny.json"
    deadline = time.monotonic() + 60
    while not seen.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert seen.is_file() and proc.returncode == 0, out
    assert "watching tiny's sources every 0.2 s" in out and "first look at tiny's sources" in out
