"""Shared test setup: offline environment, a throwaway PREFECT_HOME per process (and the rest of
what each pytest-xdist worker needs), the corpora beside the repo."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect, Gradio or datasets: no network, no telemetry, and a Prefect
# home that is not the developer's. One per process: xdist's workers inherit the controller's
# environment, and a flow run without the `prefect_api` fixture starts a temporary server on the
# home's SQLite database, which two workers must not migrate at once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ember-test-prefect-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist starts its workers with COLUMNS=80, which a serial run does not have; rich fixes a
    # console's width from it when the console is made (the CLI's, at import), and would then
    # cut the tables that a test gives a wider COLUMNS to print whole.
    os.environ.pop("COLUMNS", None)
    # Several workers already fill the cores: one OpenMP thread per process (the worker and the
    # processes its tests start, which inherit this), or each torch op spreads over threads that
    # spin waiting for cores the other workers hold (measured on 3 workers: 20% more CPU time for
    # the suite, 5x for the tests that train).
    os.environ["OMP_NUM_THREADS"] = "1"
import ember.flows  # noqa: E402,F401  (sets the offline defaults)
from helpers import CORPORA  # noqa: E402


@pytest.fixture(scope="session")
def corpora() -> Path:
    """`../shared/corpora`, the real text kept beside the repo (never copied into it)."""
    assert CORPORA.is_dir(), f"the shared corpora are missing: expected them at {CORPORA}"
    return CORPORA


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpora) -> Path:
    """A train_tokenizer artifact on tiny Shakespeare (release_builders.py), for publish inputs."""
    from release_builders import shakespeare_tokenizer

    return shakespeare_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpora)


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
