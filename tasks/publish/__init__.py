"""The `publish` stage, as a package: stage.py (the gate and the release it builds) and
model_card.py (the release's README.md and pipeline.yaml, read from the artifacts behind it).
The release registry itself (versions, `latest`, rollback) is storage/releases.py."""

from ember.tasks.publish.stage import STAGE, PublishConfig, run

__all__ = ["STAGE", "PublishConfig", "run"]
