"""Ember on a Prefect work pool, as on a cluster: a real server, the deployments of prefect.yaml
(`prefect deploy --all`), and two process workers in folders of their own ("machines" that
share nothing but the server and the SeaweedFS bucket the store is in), each picking up a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline_configs import write_config
from test_prefect_server import FAST, free_port, start, stop, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_two_workers_share_the_runs_through_the_object_store(s3, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **s3.env,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "COLUMNS": "200",
    }
    env.pop("EMBER_HOME", None)
    url = f"s3://ember/{tmp_path.name}"
    config = write_config(tmp_path, **FAST, store={"root": url})
    procs = []
    try:
        procs.append(
            start(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                {k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                tmp_path / "server.log",
                tmp_path,
            )
        )

        def healthy():
            try:
                return urllib.request.urlopen(f"{api}/health", timeout=5).status == 200
            except OSError:
                assert procs[0].poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                return False

        wait_for("the Prefect server", healthy, 180)

        def run(*args, cwd=tmp_path):
            result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            return result.stdout

        run(str(BIN / "prefect"), "work-pool", "create", "ember", "--type", "process")
        run(str(BIN / "prefect"), "variable", "set", "ember_config", run(str(BIN / "ember"), "config", str(config)))
        run(
            str(BIN / "prefect"),
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(REPO / "prefect.yaml"),
            cwd=REPO,
        )
        automations = run(str(BIN / "prefect"), "automation", "ls")
        assert "ember.corpus.changed" in automations and "retrain" in automations, automations

        machines = []
        for name in ("a", "b"):
            folder = tmp_path / f"machine-{name}"
            folder.mkdir()
            procs.append(
                start(
                    [
                        str(BIN / "prefect"),
                        "worker",
                        "start",
                        "--pool",
                        "ember",
                        "--limit",
                        "1",
                        "--name",
                        f"worker-{name}",
                    ],
                    {**env, "EMBER_CACHE": str(folder / "cache")},
                    folder / "worker.log",
                    folder,
                )
            )
            machines.append(folder)

        ids = []
        for _ in range(2):
            out = run(str(BIN / "prefect"), "deployment", "run", "build-llm/build")
            ids.append(next(line.split()[-1] for line in out.splitlines() if "UUID" in line))

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        def states():
            with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                return {i: client.read_flow_run(i).state for i in ids}

        def finished():
            found = states()
            for i, state in found.items():
                assert not state.is_final() or state.is_completed(), f"{i}: {state}\n" + "\n".join(
                    (m / "worker.log").read_text()[-2000:] for m in machines
                )
            return all(state.is_completed() for state in found.values())

        wait_for("both runs to complete", finished, 420, every=1)
    finally:
        for proc in reversed(procs):
            stop(proc)

    # Each machine ran one of them, from its own folder, with only the bucket in common. (Both
    # workers may try to claim a run; the server lets one have it. The flow's own first lines,
    # "View at .../flow-run/<id>", are in the log of the worker that ran it.)
    ran = [
        {i for i in ids for line in (m / "worker.log").read_text().splitlines() if "View at" in line and i in line}
        for m in machines
    ]
    assert sorted(map(len, ran)) == [1, 1] and ran[0] != ran[1], ran
    for folder in machines:
        assert not (folder / ".ember").exists()  # no local store: the store is the bucket
        (cache,) = (folder / "cache").iterdir()
        assert (cache / "artifacts").is_dir()
    verify = subprocess.run(
        [str(BIN / "ember"), "verify", "--store", url],
        env={**env, "EMBER_CACHE": str(tmp_path / "c")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0 and "10 artifacts verified" in verify.stdout, verify.stdout + verify.stderr
    assert (
        json.loads(
            subprocess.run([str(BIN / "ember"), "config", str(config)], capture_output=True, text=True, env=env).stdout
        )["store"]["root"]
        == url
    )
