"""`make server PREFECT_PORT=N` serves a UI that talks to the API on port N, not on Prefect's
default 4200: the UI reads its API address from the server's `/ui-settings`.

The real `make server`, with the venv this test runs in (VENV=...), in its own process group,
killed after. The venv is installed already: `make -o VENV/.installed` keeps make from
reinstalling it when pyproject.toml is newer than the stamp.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_prefect_server import free_port, start, stop, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def get(url: str, accept: str = "*/*") -> tuple[int, str, str]:
    """(status, final url after redirects, body)."""
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.geturl(), response.read().decode("utf-8", "replace")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_server_on_another_port_serves_a_working_ui(tmp_path):
    assert sys.prefix != sys.base_prefix, "run the tests in the project's venv"
    stamp = VENV / ".installed"
    assert stamp.exists(), f"{stamp} is missing: run `make install` first"
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "COLUMNS": "200",
    }
    for name in (
        "PREFECT_UI_API_URL",
        "PREFECT_SERVER_UI_API_URL",
        "PREFECT_SERVER_API_PORT",
        "PREFECT_UI_ENABLED",
        "PREFECT_SERVER_UI_ENABLED",
        "MAKEFLAGS",
        "MAKELEVEL",
    ):
        env.pop(name, None)
    # What the README tells users to export for the default server: it must not decide where
    # this server's UI looks for the API.
    env["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
    log = tmp_path / "server.log"
    proc = start(
        ["make", "-C", str(REPO), "-o", f"{VENV}/.installed", "server", f"PREFECT_PORT={port}", f"VENV={VENV}"],
        env,
        log,
        tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy():
            try:
                return get(f"{base}/api/health")[0] == 200
            except OSError:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                return False

        wait_for("the Prefect server started by make", healthy, 180)

        status, _, body = get(f"{base}/ui-settings", accept="application/json")
        assert status == 200
        api_url = json.loads(body)["api_url"]
        assert urllib.parse.urlsplit(api_url).port == port, api_url
        assert api_url == f"{base}/api"
        status, _, body = get(f"{api_url}/health")  # the address the UI will call answers
        assert status == 200 and body.strip() == "true"

        # The UI's index page (a browser asks for HTML; the server may redirect to its default UI).
        status, final_url, body = get(f"{base}/", accept="text/html")
        assert status == 200
        assert urllib.parse.urlsplit(final_url).port == port
        assert "<html" in body.lower() and "<script" in body.lower(), body[:500]
    finally:
        stop(proc)
    assert proc.poll() is not None
    assert "pip install" not in log.read_text(errors="replace"), "make reinstalled the venv"
