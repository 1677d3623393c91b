"""publish: copy a trained model, its tokenizer and its report into `releases/<version>/`.

Releases live outside the artifact store (`<store_root>/releases/`), so gc and reruns never
touch what the demo serves. A release is built in `releases/.tmp-*` and renamed into place,
`release.json` included, so a crash never leaves half a release under a version name; then
`releases/latest` (a relative symlink) is switched with `os.replace`, so a reader sees the old
release or the new one. Publishing the same inputs again makes no new version: `latest` is
pointed at the release that already holds them.

The stage's artifact is a copy of `release.json`, which records which version it made.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from ember.storage.store import MANIFEST, file_sha256
from ember.tasks.stage import Stage, StageContext
from ember.tasks.train_tokenizer import TOKENIZER_FILES

LATEST = "latest"
RELEASE_JSON = "release.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")

# stage -> files a release takes from its artifact (all required).
REQUIRED = {
    "train": ("model.safetensors", "config.json"),
    "quantize": ("model-int8.safetensors",),
    "evaluate": ("report.json", "report.md"),
    "train_tokenizer": TOKENIZER_FILES,
}
OPTIONAL = {"train": ("loss.jsonl",)}
REPORT_IMAGES = (".png", ".svg")  # the evaluate report's plots, which report.md links by name


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_int8: bool = Field(True, description="Ship the int8 model (model-int8.safetensors) beside the fp32 one.")


def release_sources(inputs: dict[str, Path], include_int8: bool) -> dict[str, Path]:
    """Release file name -> the artifact file it is copied from."""
    sources: dict[str, Path] = {}
    for stage, names in REQUIRED.items():
        if stage == "quantize" and not include_int8:
            continue
        for name in names:
            path = inputs[stage] / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the {stage} artifact has no {name}, which a release needs")
            sources[name] = path
    for stage, names in OPTIONAL.items():
        sources.update({name: inputs[stage] / name for name in names if (inputs[stage] / name).is_file()})
    for path in sorted(inputs["evaluate"].iterdir()):
        if path.suffix in REPORT_IMAGES and path.is_file():
            sources[path.name] = path
    return sources


def artifact_ref(folder: Path) -> str:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text())["ref"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: no readable artifact ref ({err!r}); is {folder} a store artifact?") from None


def list_versions(releases: Path) -> list[str]:
    """Version folders, oldest first."""
    found = [p.name for p in releases.iterdir() if p.is_dir() and not p.is_symlink() and VERSION_RE.match(p.name)] \
        if releases.is_dir() else []
    return sorted(found, key=lambda name: int(VERSION_RE.match(name).group(1)))


def find_release(releases: Path, refs: dict[str, str], files: set[str]) -> str | None:
    """The newest version already made from these refs with these files, if any."""
    for version in reversed(list_versions(releases)):
        try:
            record = json.loads((releases / version / RELEASE_JSON).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if record.get("refs") == refs and set(record.get("files", {})) == files:
            return version
    return None


def next_version(releases: Path) -> str:
    versions = list_versions(releases)
    last = int(VERSION_RE.match(versions[-1]).group(1)) if versions else 0
    return f"v{last + 1:04d}"


def point_latest(releases: Path, version: str) -> None:
    """Switch `latest` to `version` atomically (a relative link, so the folder can move)."""
    tmp = releases / f".latest-{secrets.token_hex(4)}"
    os.symlink(version, tmp)
    os.replace(tmp, releases / LATEST)


def _build_release(releases: Path, version: str, sources: dict[str, Path], record: dict) -> Path:
    tmp = releases / f".tmp-{version}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, source in sources.items():
            shutil.copy2(source, tmp / name)
        _set_model_max_length(tmp)
        record["files"] = {name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                           for name in sorted(sources)}
        (tmp / RELEASE_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        final = releases / version
        os.rename(tmp, final)  # fails rather than merge if the version exists
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _set_model_max_length(folder: Path) -> None:
    """The tokenizer now belongs to a model: its context is the tokenizer's max length."""
    config = json.loads((folder / "config.json").read_text())
    path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["model_max_length"] = int(config["model"]["max_seq_len"])
    path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def run(cfg: PublishConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    releases = ctx.store_root / "releases"
    needed = [stage for stage in REQUIRED if stage != "quantize" or cfg.include_int8]
    missing = [stage for stage in needed if stage not in ctx.inputs]
    if missing:
        raise ValueError(f"publish needs the artifacts of {', '.join(missing)} (inputs given: {sorted(ctx.inputs)})")
    releases.mkdir(parents=True, exist_ok=True)
    sources = release_sources(ctx.inputs, cfg.include_int8)
    refs = {stage: artifact_ref(ctx.inputs[stage]) for stage in REQUIRED if stage in ctx.inputs}

    # One publisher at a time: picking a version number and switching `latest` must not interleave.
    with FileLock(str(releases / ".publish.lock")):
        for leftover in releases.glob(".tmp-*"):  # a crashed publisher's; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        version = find_release(releases, refs, set(sources))
        created = version is None
        if created:
            version = next_version(releases)
            record = {
                "version": version,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "refs": refs,
                "metrics": {stage: _manifest_metrics(ctx.inputs[stage]) for stage in refs},
            }
            _build_release(releases, version, sources, record)
        point_latest(releases, version)

    record = json.loads((releases / version / RELEASE_JSON).read_text())
    shutil.copy2(releases / version / RELEASE_JSON, ctx.out / RELEASE_JSON)
    size = sum(f["size"] for f in record["files"].values())
    ctx.report.table("release", [{"file": name, "bytes": f["size"]} for name, f in record["files"].items()],
                     f"Release {version} ({'new' if created else 'already published; latest points to it'})")
    ctx.log.info("release %s at %s (%s)", version, releases / version, "new" if created else "existing")
    return {"version": version, "path": str(releases / version), "size_bytes": size, "new": created,
            "seconds": round(time.monotonic() - started, 3)}


def _manifest_metrics(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("metrics", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


STAGE = Stage(name="publish", version=1, run=run)
