"""The `dedup` stage, as a package: config.py (its config section), hashing.py (shingles, exact
keys, MinHash signatures and LSH band keys), stage.py (the units, the global steps and the keep
rule). See stage.py for what it does."""

from ember.tasks.dedup.config import DedupConfig
from ember.tasks.dedup.hashing import jaccard, shingles
from ember.tasks.dedup.stage import STAGE, run

__all__ = ["STAGE", "DedupConfig", "jaccard", "run", "shingles"]
