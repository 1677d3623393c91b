"""The `build` deployment takes the typed pipeline config as its parameters."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_build_deployment_parameters_are_the_typed_config():
    from ember.deployments.serve import build_deployment

    deployment = build_deployment(str(REPO / "configs" / "sample.yaml"))
    assert deployment.name == "build"
    config = deployment.parameters["config"]
    assert config["name"] == "sample"
    assert config["download"]["sources"][0]["path"].endswith("gutenberg_en")
    schema = deployment._parameter_openapi_schema.model_dump()
    assert "config" in schema["required"]
    pipeline = schema["definitions"]["PipelineConfig"]
    assert {"download", "filter", "train", "publish"} <= set(pipeline["properties"])
    assert pipeline.get("additionalProperties") is False
