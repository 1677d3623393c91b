"""The release registry: published models under `<store root>/releases/`, and `latest`.

A release is a folder `releases/vNNNN/` that is never changed once written (the publish stage
builds it under `.tmp-*` and renames it into place, then makes its files read-only).
`releases/latest` is a relative symlink to the served version, switched atomically with
`os.replace` under `publish_lock`, so a reader sees the old release or the new one;
`releases/history.jsonl` records every switch (publish, rollback). Each release holds
`release.json`: its version, date, the store refs it was made from (`refs`, and every upstream
artifact under `lineage`) and each file's size and sha256.

Who reads it: the publish stage (versions, the gate's "published model"), the demo (what to
serve), the CLI (`ember releases`, `ember publish --rollback`), gc (what to keep) and the flow
(which release a warm start continues from).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from filelock import FileLock

from ember.storage.store import read_json_or_none

LATEST = "latest"
RELEASE_JSON = "release.json"
CARD = "README.md"  # the model card
HISTORY = "history.jsonl"
WEIGHTS = "model.safetensors"
VERSION_RE = re.compile(r"^v(\d{4,})$")


def list_versions(releases: Path) -> list[str]:
    """Version folders, oldest first."""
    found = (
        [p.name for p in releases.iterdir() if p.is_dir() and not p.is_symlink() and VERSION_RE.match(p.name)]
        if releases.is_dir()
        else []
    )
    return sorted(found, key=_number)


def find_release(releases: Path, refs: dict[str, str], layout: dict[str, Any]) -> str | None:
    """The newest version already made from these refs with this layout, if any."""
    for version in reversed(list_versions(releases)):
        try:
            record = json.loads((releases / version / RELEASE_JSON).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if record.get("refs") == refs and record.get("layout") == layout:
            return version
    return None


def next_version(releases: Path) -> str:
    versions = list_versions(releases)
    last = _number(versions[-1]) if versions else 0
    return f"v{last + 1:04d}"


def point_latest(releases: Path, version: str, why: str = "publish") -> None:
    """Switch `latest` to `version` atomically (a relative link, so the folder can move), and
    note the switch in history.jsonl. Callers hold the publish lock."""
    previous = current_version(releases)
    tmp = releases / f".latest-{secrets.token_hex(4)}"
    os.symlink(version, tmp)
    os.replace(tmp, releases / LATEST)
    if previous != version:
        with open(releases / HISTORY, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "latest": version,
                        "was": previous,
                        "why": why,
                    }
                )
                + "\n"
            )


def current_version(releases: Path) -> str | None:
    """The version `latest` points to, or None."""
    try:
        return os.readlink(releases / LATEST)
    except (FileNotFoundError, OSError):
        return None


def publish_lock(releases: Path) -> FileLock:
    """One publisher (or rollback) at a time: picking a version and switching `latest` must not interleave."""
    releases.mkdir(parents=True, exist_ok=True)
    return FileLock(str(releases / ".publish.lock"))


def rollback(releases: Path, version: str | None = None) -> tuple[str | None, str]:
    """Point `latest` at `version`, by default the release before the current one. Returns (was, now)."""
    releases = Path(releases)
    with publish_lock(releases):
        versions = list_versions(releases)
        if not versions:
            raise ValueError(f"no releases in {releases}; `ember run CONFIG` publishes one")
        current = current_version(releases)
        if version is None:
            number = _number(current) if current and VERSION_RE.match(current) else None
            older = [v for v in versions if number is not None and _number(v) < number]
            if not older:
                raise ValueError(
                    f"latest is {current}, the oldest release: nothing older to roll back to "
                    f"(releases: {', '.join(versions)})"
                )
            version = older[-1]
        if version not in versions:
            raise ValueError(f"no release {version!r} in {releases} (releases: {', '.join(versions)})")
        if not (releases / version / WEIGHTS).is_file():
            raise ValueError(f"{releases / version} has no {WEIGHTS}; not a usable release")
        point_latest(releases, version, why="rollback")
    return current, version


def _number(version: str) -> int:
    """The number of a version name (one that VERSION_RE matches: callers check or list only those)."""
    match = VERSION_RE.match(version)
    assert match is not None, version
    return int(match.group(1))


class ReleaseRow(TypedDict):
    """One row of `list_releases`; the figures are None where the release's reports lack them."""

    version: str
    created: str
    bpb: float | None
    val_loss: float | None
    int8_bpb: float | None
    steps: int | None
    tokens: int | None
    size_bytes: int
    latest: bool


def list_releases(releases: Path) -> list[ReleaseRow]:
    """One row per release, oldest first: version, date, eval figures, size, whether it is latest."""
    releases = Path(releases)
    latest = current_version(releases)
    rows: list[ReleaseRow] = []
    for version in list_versions(releases):
        folder = releases / version
        record = read_json_or_none(folder / RELEASE_JSON) or {}
        report = read_json_or_none(folder / "report.json") or {}
        fp32, int8 = report.get("fp32", {}), report.get("int8", {})
        train = (read_json_or_none(folder / "config.json") or {}).get("train", {})
        rows.append(
            {
                "version": version,
                "created": record.get("created", ""),
                "bpb": fp32.get("bpb"),
                "val_loss": fp32.get("val_loss"),
                "int8_bpb": int8.get("bpb"),
                "steps": train.get("steps"),
                "tokens": train.get("tokens"),
                "size_bytes": sum(f.get("size", 0) for f in record.get("files", {}).values()),
                "latest": version == latest,
            }
        )
    return rows


def latest_release(releases: Path) -> Path | None:
    """The release folder `latest` points to, if it holds weights."""
    latest = Path(releases) / LATEST
    return latest.resolve() if (latest / WEIGHTS).is_file() else None


def _release_tokens(release: Path) -> str | None:
    """The tokenize ref a release was trained on (release.json's lineage), if it says."""
    try:
        record = json.loads((release / RELEASE_JSON).read_text())
        return (record.get("lineage") or {}).get("tokenize") or (record.get("refs") or {}).get("tokenize")
    except (OSError, AttributeError, json.JSONDecodeError):
        return None


def pick_release(releases: Path, tokens_ref: str | None) -> Path | None:
    """For `warm_start: true`: the newest release up to `latest` not trained on these very tokens."""
    latest = latest_release(releases)
    if latest is None:
        return None
    candidates = sorted(
        (
            p
            for p in latest.parent.iterdir()
            if VERSION_RE.match(p.name) and p.name <= latest.name and (p / WEIGHTS).is_file()
        ),
        key=lambda p: p.name,
        reverse=True,
    )
    for release in candidates:
        if tokens_ref is None or _release_tokens(release) != tokens_ref:
            return release
    return None
