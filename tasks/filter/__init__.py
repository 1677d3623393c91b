"""The `filter` stage, as a package: config.py (the thresholds), langid.py (offline language id),
lines.py (C4's line and document rules), rules.py (Gopher and FineWeb as a list of document rules),
stage.py (the steps in order, and the stage). See stage.py for what happens to a document."""

from ember.tasks.filter.config import FilterConfig
from ember.tasks.filter.lines import line_rules
from ember.tasks.filter.stage import STAGE, check, judge, run

__all__ = ["STAGE", "FilterConfig", "check", "judge", "line_rules", "run"]
