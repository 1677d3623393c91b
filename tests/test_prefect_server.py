"""Ember the Prefect way, end to end: a real `prefect server start`, the serve process with every
deployment, `prefect deployment run --watch` from the CLI, a schedule that fires and a corpus
change that triggers a retrain. Every process runs in its own process group and is killed after.

Times on 2 busy cores: the server is up in about 20 s, a run of the tiny config takes 15-30 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from helpers import CHROMIUM_ARGS, screenshot
from pipeline_configs import settled_task_runs, write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = [
    "download",
    "normalize",
    "filter",
    "dedup",
    "train_tokenizer",
    "tokenize",
    "train",
    "quantize",
    "evaluate",
    "publish",
]
# A few seconds of training: the point is the orchestration, not the model.
FAST: dict[str, Any] = {
    "train": {
        "batch_size": 4,
        "max_steps": 4,
        "warmup_steps": 1,
        "eval_every": 4,
        "eval_batches": 1,
        "checkpoint_every": 4,
        "log_every": 2,
    },
    "evaluate": {"eval_batches": 1, "batch_size": 4, "prompts": ["Once upon a time"], "max_new_tokens": 8},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group and everything under it (the runner starts each flow run in a
    session of its own), then SIGKILL what is left."""
    try:
        groups = {os.getpgid(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
    except (psutil.NoSuchProcess, ProcessLookupError):
        groups = {proc.pid}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=15)
            if sig == signal.SIGTERM:
                time.sleep(1)  # let the group's other members go too
        except subprocess.TimeoutExpired:
            pass


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Served:
    def __init__(self, tmp: Path, corpora: Path):
        self.tmp = tmp
        self.source = tmp / "stories"
        self.source.mkdir()
        text = (corpora / "tinystories_sample" / "tinystories_valid_head.txt").read_text(encoding="utf-8")
        self.spare = text[250_000:350_000]  # the text of the file added later
        (self.source / "part-1.txt").write_text(text[:250_000], encoding="utf-8")
        self.store = tmp / "store"
        self.config = write_config(
            tmp,
            "tiny.yaml",
            **FAST,
            store={"root": str(self.store)},
            download={"sources": [{"name": "stories", "path": str(self.source)}]},
            schedule={"cron": None, "interval_seconds": 120, "watch_seconds": 8},
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        # The UI is on, for test_the_ui_shows_the_run_at_a_glance; it must call this server's API.
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": self.url,
            "PREFECT_UI_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
        self.env.pop("EMBER_HOME", None)
        self.procs: list[subprocess.Popen] = []

    def start_server(self) -> None:
        env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        self.procs.append(
            start(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env,
                self.tmp / "server.log",
                self.tmp,
            )
        )

        def healthy():
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    return response.status == 200
            except OSError:
                assert self.procs[0].poll() is None, (self.tmp / "server.log").read_text()[-3000:]
                return False

        wait_for("the Prefect server", healthy, 180)

    def start_serve(self) -> None:
        self.procs.append(
            start(
                [sys.executable, "-m", "ember.deployments.serve", str(self.config)],
                self.env,
                self.tmp / "serve.log",
                self.tmp,
            )
        )
        for name in ("build-llm/build", "build-llm/retrain", "ember-demo/demo"):
            wait_for(f"deployment {name}", lambda name=name: self.deployment(name), 120, every=2)

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "prefect"), *args], env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout
        )

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        class Client:
            def __enter__(inner):
                inner.settings = temporary_settings({PREFECT_API_URL: self.url})
                inner.settings.__enter__()
                inner.client = get_client(sync_client=True)
                return inner.client.__enter__()

            def __exit__(inner, *exc):
                inner.client.__exit__(*exc)
                inner.settings.__exit__(*exc)

        return Client()

    def deployment(self, name: str):
        from prefect.exceptions import ObjectNotFound

        with self.client() as client:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                return None

    def flow_runs(self, deployment: str) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        deployment_id = self.deployment(deployment).id
        with self.client() as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                sort=FlowRunSort.START_TIME_ASC,
                limit=200,
            )

    def task_states(self, flow_run_id) -> dict[str, str | None]:
        with self.client() as client:
            runs = settled_task_runs(client, flow_run_id)
        return {run.name: run.state.name if run.state else None for run in runs if run.name in STAGES}

    def log(self, name: str, whole: bool = False) -> str:
        text = (self.tmp / name).read_text(errors="replace")
        return text if whole else text[-4000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpora):
    served = Served(tmp_path_factory.mktemp("served"), corpora)
    try:
        started = time.monotonic()
        served.start_server()
        print(f"\nserver up in {time.monotonic() - started:.0f}s")
        served.start_serve()
        print(f"deployments served after {time.monotonic() - started:.0f}s")
        yield served
    finally:
        for proc in reversed(served.procs):
            stop(proc)


def completed(served: Served, flow_run) -> bool:
    with served.client() as client:
        run = client.read_flow_run(flow_run.id)
    assert not run.state.is_final() or run.state.is_completed(), f"{run.name}: {run.state}\n{served.log('serve.log')}"
    return run.state.is_completed()


def test_build_from_the_cli_completes_with_artifacts_and_logs_in_the_api(served):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from ember.flows.config import PipelineConfig
    from ember.flows.prefect_stage import artifact_key

    result = served.prefect("deployment", "run", "build-llm/build", "--watch")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + served.log("serve.log")
    (run,) = served.flow_runs("build-llm/build")
    assert run.state.is_completed()
    config = PipelineConfig.model_validate(served.deployment("build-llm/build").parameters["config"])
    assert run.name == f"build-tiny-{config.digest()}"
    assert set(served.task_states(run.id).values()) == {"Completed"}

    with served.client() as client:
        artifacts = {
            a.key: a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        }
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert {artifact_key("tiny", "stages"), artifact_key("tiny", "release")} <= set(artifacts)
    assert any(key and key.startswith("tiny-download") for key in artifacts), sorted(artifacts, key=str)
    release = artifacts[artifact_key("tiny", "release")].data
    assert "v0001" in release and "http://127.0.0.1:7860" in release and (served.store / "releases" / "v0001").is_dir()
    # Logs of Ember's own loggers (PREFECT_LOGGING_EXTRA_LOGGERS=ember) reach the run log.
    assert any(log.name.startswith("ember.") for log in logs), sorted({log.name for log in logs})


def test_the_ui_shows_the_run_at_a_glance(served, chromium_path, tmp_path):
    """The build's run page in Chromium: one card per stage plus the run's three, the train card's
    plot drawn, the stage table in order. Its screenshots are the README's."""
    from playwright.sync_api import expect, sync_playwright

    if not served.flow_runs("build-llm/build"):  # run alone (`make screenshots`): build first
        result = served.prefect("deployment", "run", "build-llm/build", "--watch")
        assert result.returncode == 0, result.stdout[-3000:] + served.log("serve.log")
    run = served.flow_runs("build-llm/build")[0]
    ui = served.url.removesuffix("/api")
    with served.client() as client:
        cards = {
            a.key: a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        }
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(locale="en-US", viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            refused = []
            page.on("console", lambda m: refused.append(m.text) if "ERR_CONNECTION_REFUSED" in m.text else None)
            page.goto(f"{ui}/runs/flow-run/{run.id}")
            expect(page.get_by_text(run.name).first).to_be_visible()
            page.get_by_text("Artifacts", exact=True).first.click()
            for key in ("tiny-stages", "tiny-release", "tiny-progress", "tiny-train", "tiny-train-tokenizer"):
                expect(page.get_by_text(key, exact=True).first).to_be_visible()
            screenshot(page, tmp_path, "prefect-run.png")

            page.goto(f"{ui}/artifacts/artifact/{cards['tiny-train'].id}")
            expect(page.get_by_text("train · stage 7 of 10")).to_be_visible()
            plot = page.locator("img[alt='loss curve']").first
            expect(plot).to_be_visible()
            assert plot.evaluate("img => img.complete && img.naturalWidth") > 100  # drawn, not a broken link
            screenshot(page, tmp_path, "prefect-train-card.png")

            page.goto(f"{ui}/artifacts/artifact/{cards['tiny-stages'].id}")
            rows = page.locator("table tr")
            expect(rows).to_have_count(11)
            assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(1, 11)] == STAGES
            screenshot(page, tmp_path, "prefect-stages.png")
            assert refused == [], refused  # the UI talks to this server's API, not to port 4200
        finally:
            browser.close()


def test_demo_deployment_serves_the_release_until_cancelled(served):
    port = free_port()
    result = served.prefect("deployment", "run", "ember-demo/demo", "--param", f"port={port}")
    assert result.returncode == 0, result.stdout + result.stderr

    def page():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                return response.read().decode()
        except OSError:
            (run,) = served.flow_runs("ember-demo/demo")
            assert not run.state.is_final(), f"{run.state}\n{served.log('serve.log')}"
            return None

    assert "release v0001" in wait_for("the demo to answer", page, 180, every=2)
    (run,) = served.flow_runs("ember-demo/demo")
    cancel = served.prefect("flow-run", "cancel", str(run.id))
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr

    def cancelled():
        with served.client() as client:
            return client.read_flow_run(run.id).state.is_cancelled()

    wait_for("the demo run to be cancelled", cancelled, 60)

    def closed():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2)
            return False
        except OSError:
            return True

    wait_for("the demo's port to close", closed, 60)


def test_second_build_is_all_cache_hits_and_parameters_are_validated(served):
    result = served.prefect("deployment", "run", "build-llm/build", "--watch")
    assert result.returncode == 0, result.stdout[-3000:] + served.log("serve.log")
    first, second = served.flow_runs("build-llm/build")
    states = served.task_states(second.id)
    assert sorted(states) == sorted(STAGES) and set(states.values()) == {"Cached"}, states

    # The config is the typed parameter: a bad value is refused when the run is created.
    bad = served.prefect("deployment", "run", "build-llm/build", "--param", 'config={"name": "x", "bogus": 1}')
    assert bad.returncode != 0 and "bogus" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    assert len(served.flow_runs("build-llm/build")) == 2


def triggered_retrains(served: Served) -> list:
    return [
        run
        for run in served.flow_runs("build-llm/retrain")
        if run.created_by is not None and run.created_by.type == "AUTOMATION"
    ]


def test_a_new_file_in_the_source_triggers_a_retrain_and_no_change_does_not(served):
    seen = served.store / "watch" / "tiny.json"
    wait_for("the watcher's first look", seen.is_file, 120)
    # The watcher has been looking all along (every 8 s while the builds ran): no change, no run,
    # and no flow run of its own either.
    checks = lambda: served.log("serve.log", whole=True).count("tiny's sources unchanged")  # noqa: E731
    wait_for("three checks of the unchanged corpus", lambda: checks() >= 3, 120)
    assert triggered_retrains(served) == []
    with served.client() as client:
        flows = {client.read_flow(run.flow_id).name for run in client.read_flow_runs(limit=200)}
    assert flows <= {"build-llm", "ember-demo"}, flows
    before = json.loads(seen.read_text())["digest"]

    (served.source / "part-2.txt").write_text(served.spare, encoding="utf-8")
    run = wait_for("a retrain triggered by the corpus change", lambda: triggered_retrains(served), 120)[0]
    assert run.created_by.display_value == "retrain tiny when its corpus changes"
    wait_for("the triggered retrain to complete", lambda: completed(served, run), 240, every=2)
    with served.client() as client:
        assert client.read_flow_run(run.id).name.startswith("retrain-tiny-")  # named when it started
    assert json.loads(seen.read_text())["digest"] != before
    # It trained on the new file: its download artifact is not the first build's.
    build = served.flow_runs("build-llm/build")[0]
    assert used_refs(served, run.id)["download"] != used_refs(served, build.id)["download"]


def used_refs(served: Served, flow_run_id) -> dict[str, str]:
    """The artifacts a run used, from the store's run records."""
    for path in (served.store / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("flow_run_id") == str(flow_run_id):
            return record["refs"]
    raise AssertionError(f"no run record for flow run {flow_run_id}")


def test_the_retrain_schedule_fires(served):
    def scheduled_and_completed():
        return [run for run in served.flow_runs("build-llm/retrain") if run.auto_scheduled and run.state.is_completed()]

    run = wait_for("a scheduled retrain to complete", scheduled_and_completed, 240, every=3)[0]
    assert run.parameters["config"]["train"]["warm_start"] is True
    assert run.parameters["config"]["publish"]["force"] is False
