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

.PHONY: run test install demo clean server serve

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel of torch first, so no dependency can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/ember run $(CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/ember demo

# Ember under a Prefect server (README: "Run it with Prefect"): `make server` in one terminal,
# `make serve` in another. The server keeps its runs in SQLite under ~/.prefect.
PREFECT_PORT ?= 4200
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

server: $(VENV)/.installed
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(VENV)/.installed
	PREFECT_API_URL=$(PREFECT_API_URL) $(PY) -m ember.deployments.serve $(CONFIG)

clean:
	rm -rf .ember
