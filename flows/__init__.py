"""The Prefect layer: the pipeline flow, its typed config, the CLI.

Ember runs offline by default. These defaults are set before Prefect or Gradio are imported
(they read them at import); a value already in the environment wins.
"""

import os

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # The temporary server Prefect starts for a plain `ember run` needs longer than its default
    # 20 s on a busy 2-core machine (measured: 20-24 s with a fresh PREFECT_HOME).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Logs of stage logic (plain `logging` under "ember") reach the Prefect run log.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ember",
    # ...and stage logic called outside a flow (tests, notebooks) just logs locally.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}

for _name, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

import logging  # noqa: E402

# Prefect hands the "ember" logger its handlers but not a level, and the root logger's WARNING
# would hide the stages' progress lines.
logging.getLogger("ember").setLevel(logging.INFO)
