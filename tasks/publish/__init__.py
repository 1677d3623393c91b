"""The `publish` stage, as a package: stage.py (the gate and the release it builds) and
model_card.py (the release's README.md and pipeline.yaml, read from the artifacts behind it).
The release registry itself (versions, `latest`, rollback) is storage/releases.py."""

from ember.tasks.publish.stage import CARD_FORMAT, PIPELINE_YAML, STAGE, PublishConfig, gate_decision, run

__all__ = ["CARD_FORMAT", "PIPELINE_YAML", "STAGE", "PublishConfig", "gate_decision", "run"]
