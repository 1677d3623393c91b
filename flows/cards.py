"""What a run shows in the Prefect UI, as Markdown: one card per stage, the run's stage table, the release.

Pure functions over `Outcome`s (tasks/stage.py), so they are tested without a server. The UI lists
a run's artifacts in no fixed order (by id), so order lives inside the cards: each stage card says
which of the ten it is, and the run's stage table lists them in order with links to the run that
made each artifact. Images a report names by a relative path (`![loss curve](loss.png)`) are
embedded as data URIs: the UI cannot reach the store's files, and a `file://` link is refused.
"""

from __future__ import annotations

import base64
import datetime
import mimetypes
import re
from pathlib import Path
from typing import Any

from ember.tasks.stage import Outcome, ReportSection

MAX_EMBEDDED_BYTES = 2_000_000  # a plot is tens of KB; anything larger stays a link to nothing
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def run_url(ui_url: str | None, flow_run_id: str | None) -> str | None:
    """The UI page of a flow run, when there is a UI (a real server) and a run id."""
    if not ui_url or not flow_run_id:
        return None
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def run_link(made_by: dict[str, Any], ui_url: str | None) -> str:
    name = made_by.get("flow_run_name") or made_by.get("flow_run_id") or "an earlier run"
    url = run_url(ui_url, made_by.get("flow_run_id"))
    return f"[{name}]({url})" if url else f"`{name}`"


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "?"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def embed_images(markdown: str, folder: Path | None) -> str:
    """`![alt](file)` for a file in `folder` becomes a data URI; other images are left alone."""
    if folder is None:
        return markdown

    def embed(match: re.Match[str]) -> str:
        alt, target = match.groups()
        if "://" in target or target.startswith(("data:", "/")):
            return match.group(0)
        path = (folder / target).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file() or path.stat().st_size > MAX_EMBEDDED_BYTES:
            return match.group(0)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"![{alt}](data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _IMAGE.sub(embed, markdown)


def position(stage: str, stages: list[str]) -> str:
    return f"{stages.index(stage) + 1} of {len(stages)}"


def report_lines(report: list[ReportSection]) -> list[str]:
    """A stage's report sections as Markdown lines: a section that brings its own heading keeps
    it, the others get their title, if any."""
    lines = []
    for section in report:
        text = section["markdown"].strip()
        if section["title"] and not text.startswith("#"):
            lines += [f"### {section['title']}", ""]
        lines += [text, ""]
    return lines


def stage_card(outcome: Outcome, stages: list[str], ui_url: str | None = None) -> tuple[str, str]:
    """(description, markdown) of a stage's one card: what happened in this run, then its report."""
    made = outcome.made_by
    took = made.get("seconds")
    if outcome.cached:
        status = "cached"
        head = (
            f"**Cached**: found complete in the store, made by run {run_link(made, ui_url)} on "
            f"{_when(made.get('created'))}" + (f" in {took:.1f} s" if took is not None else "") + "."
        )
    else:
        status = f"ran in {outcome.seconds:.1f} s"
        head = f"**Ran** in {outcome.seconds:.1f} s in this run."
    short_ref = outcome.ref[: len(outcome.stage) + 13]
    lines = [
        f"## {outcome.stage} · stage {position(outcome.stage, stages)}",
        "",
        head + f" Artifact `{short_ref}` (`ember show {short_ref}`).",
        "",
    ]
    if not outcome.report:
        lines.append("_This artifact was made before stages kept their report; see the run above._")
    lines += report_lines(outcome.report)
    return (
        f"Stage {position(outcome.stage, stages)}: {outcome.stage}, {status}",
        embed_images("\n".join(lines).rstrip() + "\n", outcome.path),
    )


def failed_card(stage: str, error: BaseException, report: list[ReportSection], stages: list[str]) -> tuple[str, str]:
    """(description, markdown) of the card of a stage that failed: the error, and what it had
    reported until then. Nothing of it is in the store (a crash leaves no artifact)."""
    lines = [
        f"## {stage} · stage {position(stage, stages)}",
        "",
        f"**Failed**: `{type(error).__name__}: {str(error)[:2000]}`",
        "",
        "The run's log has the traceback. Nothing was written to the store; run again to retry"
        " (training resumes from its last checkpoint).",
        "",
    ]
    lines += report_lines(report)
    return f"Stage {position(stage, stages)}: {stage}, failed", "\n".join(lines).rstrip() + "\n"


def stages_table(outcomes: list[Outcome], ui_url: str | None = None) -> str:
    """The run's stages in order: what each did, and which run made the artifact it used."""
    lines = ["| # | stage | result | seconds | made by | artifact |", "|---|---|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        result = "cached" if o.cached else "**ran**"
        made = run_link(o.made_by, ui_url) if o.cached else "this run"
        lines.append(f"| {i} | {o.stage} | {result} | {o.seconds:.1f} | {made} | `{o.ref[: len(o.stage) + 13]}` |")
    ran = sum(not o.cached for o in outcomes)
    head = (
        f"All {ran} stages ran."
        if ran == len(outcomes)
        else f"All {len(outcomes)} stages were cached in the store: nothing changed."
        if ran == 0
        else f"{ran} stages ran, {len(outcomes) - ran} were cached in the store."
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def release_markdown(release: str, reason: str, latest: Path, demo_url: str, store_root: str) -> str:
    """The run's release card: which release (its folder as a path: browsers refuse `file://`
    links from a web page), and how to open the demo on it."""
    if release:
        head = f"**Release:** {Path(release).name}, in `{release}`"
    elif latest.exists():
        head = f"**{reason}**\n\nStill published: {latest.resolve().name}, in `{latest.resolve()}`"
    else:
        return f"**{reason}**"
    return (
        f"{head}\n\n**Demo:** [{demo_url}]({demo_url}), which serves `releases/latest` once started: "
        f"`prefect deployment run 'ember-demo/demo'` (with `make serve` running) or "
        f"`ember demo --store {store_root}`"
    )
