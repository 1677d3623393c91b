"""Shared test setup: offline environment, a throwaway PREFECT_HOME, the corpora beside the repo."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect, Gradio or datasets: no network, no telemetry, and a Prefect
# home that is not the developer's.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ember-test-prefect-"))
import ember.flows  # noqa: E402,F401  (sets the offline defaults)
from helpers import CORPORA  # noqa: E402


@pytest.fixture(scope="session")
def corpora() -> Path:
    """`../shared/corpora`, the real text kept beside the repo (never copied into it)."""
    assert CORPORA.is_dir(), f"the shared corpora are missing: expected them at {CORPORA}"
    return CORPORA


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server for the session (Prefect's test harness); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the session, with the bucket `ember`; this process's
    environment points botocore at it (tests that start processes pass `s3.env` on)."""
    from object_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.wait("ember")
        saved = {name: os.environ.get(name) for name in server.env}
        os.environ.update(server.env)
        yield server
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium, which Playwright drives (it never downloads a browser here). Without it
    a browser test is skipped, except in CI, where it fails."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        message = f"no Chromium at {chromium}: apt-get install -y chromium fonts-noto-cjk"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP
    threads fighting for one free core run 10-20x slower; one thread keeps the tests fast."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
