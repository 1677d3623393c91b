"""The `dedup` section of a pipeline config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(
        True, description="remove exact duplicates (same text after lowercasing and collapsing whitespace)"
    )
    minhash: bool = Field(True, description="remove near-duplicates with MinHash LSH")
    # 20 bands x 8 rows (160 hashes): a pair at Jaccard s becomes a candidate with probability
    # P(s) = 1 - (1 - s^8)^20: P(0.6) = 0.29, P(0.7) = 0.70, P(0.8) = 0.975, P(0.85) = 0.998,
    # P(0.9) = 1.000. datatrove's 14 x 8 gives P(0.8) = 0.92; an "optimal" 9 x 13 only 0.40.
    # The extra candidates below 0.8 cost an exact Jaccard each and are rejected.
    bands: int = Field(20, ge=1, le=64, description="LSH bands")
    rows: int = Field(8, ge=1, le=32, description="MinHash values per band (bands * rows hashes in all)")
    threshold: float = Field(
        0.8, gt=0, le=1, description="a candidate pair is a duplicate at this exact Jaccard similarity or more"
    )
    ngram: int = Field(5, ge=1, description="words per shingle (spaced languages)")
    char_ngram: int = Field(4, ge=1, description="characters per shingle for CJK-heavy text")
    cjk_fraction: float = Field(
        0.3, ge=0, le=1, description="above this share of CJK characters, shingle characters instead of words"
    )
    seed: int = Field(1, description="seed of the MinHash permutations")
    keep: Literal["first", "longest"] = Field(
        "first",
        description="which document of a cluster is kept: the first in input order, or the longest (ties: the first)",
    )
    unit_chars: int = Field(
        4_000_000, ge=1000, description="about this many characters per parallel unit (a shard or a row range)"
    )
    report_clusters: int = Field(10, ge=0, description="largest clusters listed in the report")
