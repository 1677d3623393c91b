"""The demo outlives a restart of the Prefect server (issue 14), for real: a `prefect server
start`, the serve process, a demo run; the server is stopped (SIGTERM to its process group, as
Ctrl-C or a service manager would) and started again on the same port and PREFECT_HOME. The demo
answers throughout, a second demo on its port is refused, and cancelling the run from the CLI
after the restart still stops the demo and frees the port.

Before the fix the demo deployment had a concurrency limit: its run held a lease the server keeps
in memory, so the first renewal after a restart (225 s into the run) got 410 Gone and Prefect
crashed the run. That takes minutes to show; this test checks instead that the run holds no lease.
The restart also makes the serve process's runner give up watching for cancellations (after 3
failed polls), so the cancel below goes through the demo run's own check of its state.

About 105 s on 2 busy cores: each server start is about 20 s, and the cancel after the restart
takes about 25 s (the demo run leaves a Cancelling run to the serve process for 20 s first).
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from ember.deployments.serve import STATE_CHECK_SECONDS
from pipeline_configs import write_config
from test_prefect_server import Served, free_port, stop, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def served(tmp_path, corpora):
    served = Served(tmp_path, corpora)
    # No schedule and no watcher: nothing runs but the demo.
    write_config(
        tmp_path,
        "tiny.yaml",
        store={"root": str(served.store)},
        download={"sources": [{"name": "stories", "path": str(served.source)}]},
        schedule={"cron": None, "interval_seconds": None, "watch_seconds": None},
    )
    try:
        served.start_server()
        served.start_serve()
        yield served
    finally:
        for proc in reversed(served.procs):
            stop(proc)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def run_demo(served: Served, port: int):
    result = served.prefect("deployment", "run", "ember-demo/demo", "--param", f"port={port}")
    assert result.returncode == 0, result.stdout + result.stderr
    (flow_run_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", result.stdout)
    with served.client() as client:
        return client.read_flow_run(flow_run_id)


def state(served: Served, run):
    with served.client() as client:
        return client.read_flow_run(run.id).state


def restart_server(served: Served) -> None:
    """Stop the server (its process group: SIGTERM, then SIGKILL after 15 s) and start it again
    on the same port and PREFECT_HOME; the serve process stays."""
    server, *others = served.procs
    stop(server)
    (served.tmp / "server.log").rename(served.tmp / "server-before-restart.log")
    served.procs = []
    try:
        served.start_server()
    finally:
        served.procs += others


def test_the_demo_outlives_a_server_restart_and_cancel_still_stops_it(served):
    started = time.monotonic()
    port = free_port()
    run = run_demo(served, port)

    def demo_up():
        assert not state(served, run).is_final(), f"{state(served, run)}\n{served.log('serve.log')}"
        return answers(port)

    wait_for("the demo to answer", demo_up, 120)
    assert state(served, run).is_running()
    # Nothing that a restart would lose: no deployment concurrency limit, so no lease to renew.
    assert served.deployment("ember-demo/demo").concurrency_limit is None
    assert state(served, run).state_details.deployment_concurrency_lease_id is None

    # One demo per port: a second run on the same port fails at once and names the first; one
    # on another port serves beside it, and cancelling it (the serve process stops it) frees
    # its port.
    other_port = free_port()
    second, other = run_demo(served, port), run_demo(served, other_port)
    wait_for("the second demo to fail", lambda: state(served, second).is_final(), 90)
    refused = state(served, second)
    assert refused.is_failed(), refused
    assert f"port {port}" in refused.message and str(run.id) in refused.message, refused.message
    wait_for("the demo on another port to answer", lambda: answers(other_port), 90)
    cancel = served.prefect("flow-run", "cancel", str(other.id))
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_for("the other demo run to be cancelled", lambda: state(served, other).is_cancelled(), 60)
    wait_for("the other demo's port to close", lambda: not answers(other_port), 30)
    assert answers(port) and state(served, run).is_running()
    print(f"\ndemo up, second refused, another cancelled after {time.monotonic() - started:.0f}s")

    restart_server(served)
    down_and_up = time.monotonic()
    # The demo serves on, and its run, which reads its own state every few seconds, too.
    for _ in range(3):
        assert answers(port), served.log("serve.log")
        assert state(served, run).is_running(), state(served, run)
        time.sleep(STATE_CHECK_SECONDS)
    print(f"server restarted after {time.monotonic() - started:.0f}s")

    cancel = served.prefect("flow-run", "cancel", str(run.id))
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_for("the demo run to be cancelled", lambda: state(served, run).is_cancelled(), 90)
    wait_for("the demo's port to close", lambda: not answers(port), 30)
    log = served.log("serve.log", whole=True)
    path = "the run itself" if "the serve process did not stop it" in log else "the serve process"
    print(
        f"cancelled through {path} after {time.monotonic() - started:.0f}s "
        f"({time.monotonic() - down_and_up:.0f}s after the restart)"
    )
    assert "Crash" not in log and "lease renewal" not in log, log[-4000:]
