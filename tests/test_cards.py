"""What a stage reports and how a run shows it: the report's sections, progress to the end, and the
Markdown cards of flows/cards.py (no Prefect server needed)."""

from __future__ import annotations

import base64
from pathlib import Path

from ember.flows.cards import embed_images, stage_card, stages_table
from ember.tasks.stage import Outcome, Reporter, markdown_table

STAGES = ["download", "normalize", "filter"]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_markdown_table_escapes_pipes_and_newlines_and_groups_thousands():
    table = markdown_table([{"rule": "a|b", "docs": 12345}, {"rule": "two\nlines", "chars": 7}])
    assert table.splitlines() == [
        "| rule | docs | chars |",
        "|---|---|---|",
        "| a\\|b | 12,345 |  |",
        "| two lines |  | 7 |",
    ]
    assert markdown_table([]) == "(none)"


def test_a_section_reported_again_replaces_the_first_in_its_place():
    reporter = Reporter("train")
    reporter.table("loss", [{"step": 10}], "Loss (step 10)")
    reporter.markdown("summary", "### Training\n- done")
    reporter.table("loss", [{"step": 20}], "Loss")
    assert [(s["key"], s["title"]) for s in reporter.report()] == [("loss", "Loss"), ("summary", "")]
    assert "| 20 |" in reporter.report()[0]["markdown"]


class Heard(Reporter):
    def __init__(self):
        super().__init__("dedup")
        self.heard: list[tuple] = []

    def _on_progress(self, pct, what, done, total):
        self.heard.append((what, done, total, pct))


def test_finish_takes_every_unfinished_loop_to_100_percent():
    reporter = Heard()
    reporter.progress(1, 4, "dedup: signatures")
    reporter.progress(3, 4, "dedup: verified")
    reporter.progress(5, 5, "other")
    reporter.finish()
    assert reporter.heard[-2:] == [("dedup: signatures", 4, 4, 100.0), ("dedup: verified", 4, 4, 100.0)]
    reporter.heard.clear()
    reporter.finish()  # nothing left to finish
    assert reporter.heard == []


def test_images_of_the_artifact_are_embedded_and_nothing_else(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "loss.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    text = "![loss](loss.png) ![gone](missing.png) ![up](../secret.png) ![web](https://example.org/a.png)"
    out = embed_images(text, tmp_path / "art")
    assert out.startswith("![loss](data:image/png;base64," + base64.b64encode(PNG).decode() + ")")
    assert out.endswith(" ![gone](missing.png) ![up](../secret.png) ![web](https://example.org/a.png)")
    assert embed_images(text, None) == text


def outcome(cached: bool, report: list[dict], path: Path | None = None) -> Outcome:
    return Outcome(
        "normalize",
        "normalize/" + "ab" * 32,
        cached,
        0.02 if cached else 3.25,
        {},
        path,
        {"flow_run_id": "1234-5678", "flow_run_name": "build-tiny-0badc0de", "created": 1796558400.0, "seconds": 3.25},
        report,
    )


def test_a_stage_card_says_where_it_stands_and_what_it_reported(tmp_path):
    (tmp_path / "plot.png").write_bytes(PNG)
    report = [
        {"key": "changes", "title": "What normalize changed", "markdown": "| docs |\n|---|\n| 3 |"},
        {"key": "summary", "title": "Summary", "markdown": "### Own heading\n![plot](plot.png)"},
        {"key": "note", "title": "", "markdown": "A line without a title."},
    ]
    description, card = stage_card(outcome(False, report, tmp_path), STAGES)
    assert description == "Stage 2 of 3: normalize, ran in 3.2 s"
    lines = card.splitlines()
    assert lines[0] == "## normalize · stage 2 of 3"
    assert "**Ran** in 3.2 s in this run. Artifact `normalize/abababababab`" in card
    assert card.index("### What normalize changed") < card.index("| 3 |") < card.index("### Own heading")
    assert "### Summary" not in card and "![plot](data:image/png;base64," in card
    assert card.endswith("\n\nA line without a title.\n")


def test_a_cached_card_links_the_run_that_made_the_artifact():
    description, card = stage_card(outcome(True, []), STAGES, ui_url="http://127.0.0.1:4200")
    assert description == "Stage 2 of 3: normalize, cached"
    assert (
        "made by run [build-tiny-0badc0de](http://127.0.0.1:4200/runs/flow-run/1234-5678) on "
        "2026-12-06 12:00 UTC in 3.2 s"
    ) in card
    assert "made before stages kept their report" in card  # an artifact from before this change
    _, offline = stage_card(outcome(True, []), STAGES, ui_url=None)  # a temporary server: no page to link
    assert "made by run `build-tiny-0badc0de`" in offline


def test_the_stage_table_is_in_order_and_counts_what_ran():
    table = stages_table([outcome(False, []), outcome(True, [])], ui_url="http://ui")
    assert table.startswith("1 stages ran, 1 were cached in the store.")
    rows = table.splitlines()[4:]
    assert rows[0].startswith("| 1 | normalize | **ran** | 3.2 | this run |")
    assert rows[1].startswith(
        "| 2 | normalize | cached | 0.0 | [build-tiny-0badc0de](http://ui/runs/flow-run/1234-5678) |"
    )


def test_a_failed_stage_card_gives_the_error_and_what_was_reported_before():
    from ember.flows.cards import failed_card

    report = [{"key": "sources", "title": "Sources read", "markdown": "| source |\n|---|\n| a |"}]
    description, card = failed_card("filter", ValueError("shard part-00001.parquet: bad row 12"), report, STAGES)
    assert description == "Stage 3 of 3: filter, failed"
    assert "**Failed**: `ValueError: shard part-00001.parquet: bad row 12`" in card
    assert card.index("**Failed**") < card.index("### Sources read") < card.index("| a |")
