"""One serve process with Ember's deployments, for `prefect server start` + this script.

    python -m ember.deployments.serve configs/sample.yaml
    prefect deployment run 'build-llm/build'

The `build` deployment's default parameters are the typed config loaded from the YAML file, so
the UI shows (and validates) every field; `--param`/`--params` override them per run.
"""

from __future__ import annotations

import sys

import ember.flows  # noqa: F401  (offline defaults before Prefect loads)
from prefect import serve

from ember.flows.config import load_config
from ember.flows.pipeline import build_llm


def build_deployment(config_path: str):
    config = load_config(config_path)
    return build_llm.to_deployment(
        name="build",
        parameters={"config": config.model_dump(mode="json")},
        description=f"Build a model from {config.name}'s sources (manual runs)",
        tags=["ember", config.name],
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    serve(build_deployment(args[0] if args else "configs/sample.yaml"))


if __name__ == "__main__":
    main()
