"""The content-addressed artifact store.

An artifact is a folder `artifacts/<stage>/<key>/` holding a stage's output files and a
`manifest.json`. Its key is the sha256 of a canonical JSON of the stage name, the stage's
version, the stage's own config section and the refs of its input artifacts, so a change
anywhere upstream gives a new key downstream and nothing else does.

Writing is crash-safe: files go to `tmp/<stage>-<key>-<pid>-<rand>/`, the manifest (file list
with sizes and sha256, params, inputs, metrics, timing) is written last, and the folder is
renamed into place. A folder under `artifacts/` without a manifest is not an artifact and is
never read. One lock file per key keeps two runs from writing the same artifact at once; the
second one waits (with a timeout) and then finds the first one's artifact.

Layout under the root:
    artifacts/<stage>/<key>/   complete artifacts (manifest.json last)
    tmp/                       artifacts being written (or left by a crash; gc removes them)
    work/<stage>/<key>/        scratch that must survive a crash (training checkpoints)
    locks/                     one lock file per key
    runs/                      one record per pipeline run: which refs it used
    releases/                  published models (written by the publish stage)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from filelock import FileLock, Timeout

MANIFEST = "manifest.json"
ROOT_ENV = "EMBER_HOME"
DEFAULT_ROOT = ".ember"


class StoreError(RuntimeError):
    pass


class LockTimeout(StoreError):
    pass


class FileEntry(TypedDict):
    """One file of an artifact, as its manifest lists it under `files`."""

    size: int
    sha256: str


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def compute_key(stage: str, version: int, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """sha256 of what determines a stage's output: nothing else (not time, not paths of the store)."""
    payload = {"stage": stage, "version": version, "params": params, "inputs": inputs}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def make_ref(stage: str, key: str) -> str:
    return f"{stage}/{key}"


def split_ref(ref: str) -> tuple[str, str]:
    stage, _, key = ref.partition("/")
    if not stage or len(key) != 64:
        raise StoreError(f"not an artifact ref (expected STAGE/SHA256): {ref!r}")
    return stage, key


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_digest(files: dict[str, FileEntry]) -> str:
    """What an artifact holds, as one hash: names, sizes and checksums of its files.

    Downstream artifacts record their inputs' digests: an input rebuilt with other content
    makes them stale, an input rebuilt byte for byte does not.
    """
    return hashlib.sha256(canonical_json(files).encode()).hexdigest()


def read_json_or_none(path: Path) -> Any:
    """A JSON file's value, or None when it is missing or not valid JSON (a reader that can go on
    without it: a folder that is not an artifact, a release from before a file existed)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Artifact:
    ref: str
    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        stage: str = self.manifest["stage"]
        return stage

    @property
    def metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = self.manifest.get("metrics", {})
        return metrics

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.get("files", {}).values())


class Store:
    def __init__(self, root: Path | str | None = None, lock_timeout_s: float = 3600.0):
        self.root = Path(root) if root is not None else default_root()
        self.lock_timeout_s = lock_timeout_s

    @property
    def location(self) -> str:
        """Where the artifacts are, as a person would name it (a folder here, a URL for objects)."""
        return str(self.root)

    # -- layout -------------------------------------------------------------------------------

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def releases_dir(self) -> Path:
        return self.root / "releases"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def path(self, ref: str) -> Path:
        stage, key = split_ref(ref)
        return self.artifacts_dir / stage / key

    # -- releases: a folder here; an object store mirrors it (storage/objects.py) ----------------

    def sync_releases(self) -> Path:
        """The releases folder, up to date with the store's releases."""
        return self.releases_dir

    def push_releases(self) -> None:
        """Make what was published in `releases_dir` the store's (nothing to do for a folder)."""

    def follow_releases(self, every_s: float = 60.0) -> None:
        """Keep `releases_dir` up to date in the background, for a demo (a folder always is)."""

    @contextmanager
    def releases_lock(self) -> Iterator[None]:
        """Held by whoever publishes or rolls back on any machine (a folder's own file lock,
        storage/releases.publish_lock, covers this machine)."""
        yield

    def work_dir(self, ref: str) -> Path:
        """Scratch space for `ref` that outlives a crash (e.g. checkpoints); removed on commit."""
        stage, key = split_ref(ref)
        path = self.root / "work" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- reading ------------------------------------------------------------------------------

    def get(self, ref: str) -> Artifact | None:
        """The complete artifact for `ref`, or None. An artifact without a manifest does not exist."""
        path = self.path(ref)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as err:
            raise StoreError(f"{path / MANIFEST}: corrupt manifest ({err}); run `ember verify`") from err
        return Artifact(ref=ref, path=path, manifest=manifest)

    def require(self, ref: str) -> Artifact:
        artifact = self.get(ref)
        if artifact is None:
            raise StoreError(f"artifact {ref} is not in the store at {self.location} (no complete manifest)")
        return artifact

    def ls(self, stage: str | None = None) -> list[Artifact]:
        found = []
        stages = [stage] if stage else sorted(p.name for p in self.artifacts_dir.glob("*") if p.is_dir())
        for name in stages:
            for folder in sorted((self.artifacts_dir / name).glob("*")):
                artifact = self.get(make_ref(name, folder.name)) if len(folder.name) == 64 else None
                if artifact is not None:
                    found.append(artifact)
        return sorted(found, key=lambda a: a.manifest.get("created", 0))

    def find(self, prefix: str) -> Artifact:
        """The artifact whose ref or key starts with `prefix` (like git's short hashes)."""
        matches = [a for a in self.ls() if a.ref.startswith(prefix) or a.ref.split("/")[1].startswith(prefix)]
        if not matches:
            raise StoreError(f"no artifact matches {prefix!r} in {self.location}")
        if len(matches) > 1:
            raise StoreError(f"{prefix!r} is ambiguous: {', '.join(a.ref[:30] for a in matches)}")
        return matches[0]

    # -- writing ------------------------------------------------------------------------------

    @contextmanager
    def lock(self, ref: str, timeout_s: float | None = None) -> Iterator[None]:
        stage, key = split_ref(ref)
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{stage}-{key}.lock"))
        timeout = self.lock_timeout_s if timeout_s is None else timeout_s
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise LockTimeout(
                f"artifact {ref} is being written by another run (lock {lock.lock_file}); gave up after {timeout:.0f}s"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def writer(self, ref: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield an empty temporary folder; on a clean exit, commit it as `ref`.

        The caller must hold `lock(ref)`. `manifest` holds what the caller knows (params,
        inputs, metrics, ...); it may be updated inside the block. File sizes and checksums are
        added to it on commit. On an exception the temporary folder is deleted and nothing is committed.
        """
        stage, key = split_ref(ref)
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{stage}-{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        started = time.time()
        try:
            yield tmp
            self._commit(tmp, ref, manifest, started)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path, ref: str, manifest: dict[str, Any], started: float) -> None:
        self._seal(tmp, ref, manifest, started)
        self._place(tmp, ref)

    def _seal(self, tmp: Path, ref: str, manifest: dict[str, Any], started: float) -> dict[str, Any]:
        """Add the file list (sizes, sha256) and timing to `manifest` (in place: the writer's
        caller then holds the committed manifest) and write it into `tmp`."""
        stage, key = split_ref(ref)
        files: dict[str, FileEntry] = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        manifest.update(
            {
                "ref": ref,
                "stage": stage,
                "key": key,
                "digest": content_digest(files),
                "files": files,
                "created": time.time(),
                "seconds": round(time.time() - started, 3),
            }
        )
        # The manifest is the last file written: until it exists, the folder is not an artifact.
        write_json_atomic(tmp / MANIFEST, manifest)
        return manifest

    def _place(self, tmp: Path, ref: str) -> None:
        """Rename a sealed folder into `artifacts/`, replacing what was there."""
        stage, key = split_ref(ref)
        final = self.path(ref)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            # An incomplete leftover, or the old artifact of a forced rebuild (we hold the lock):
            # move it aside, then rename, so readers see the old artifact or the new one.
            junk = self.root / "tmp" / f"stale-{stage}-{key[:16]}-{secrets.token_hex(4)}"
            os.rename(final, junk)
            shutil.rmtree(junk, ignore_errors=True)
        os.rename(tmp, final)
        work = self.root / "work" / stage / key
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)

    # -- maintenance --------------------------------------------------------------------------

    def delete(self, ref: str) -> None:
        """Remove an artifact: manifest first, so a half-deleted folder never looks complete."""
        path = self.path(ref)
        with self.lock(ref):
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    def verify(self) -> list[str]:
        """Check every artifact's files against its manifest. Returns one line per problem."""
        problems = []
        for artifact in self.ls():
            for rel, meta in artifact.manifest.get("files", {}).items():
                path = artifact.path / rel
                if not path.is_file():
                    problems.append(f"{artifact.ref}: missing {rel}")
                elif path.stat().st_size != meta["size"]:
                    problems.append(
                        f"{artifact.ref}: {rel} has {path.stat().st_size} bytes, manifest says {meta['size']}"
                    )
                elif file_sha256(path) != meta["sha256"]:
                    problems.append(f"{artifact.ref}: {rel} checksum differs from the manifest")
        for name in self.incomplete():
            problems.append(f"{name}: incomplete (no manifest); gc removes it")
        return problems

    def incomplete(self) -> list[str]:
        """Artifact folders without a manifest (a crashed writer's), relative to the root."""
        return [
            str(folder.relative_to(self.root))
            for folder in sorted(self.artifacts_dir.glob("*/*"))
            if folder.is_dir() and not (folder / MANIFEST).exists()
        ]

    def _remove_incomplete(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    # -- runs and garbage collection ----------------------------------------------------------

    def record_run(self, name: str, refs: dict[str, str], extra: dict[str, Any] | None = None) -> Path:
        """Remember which artifacts a pipeline run used, so gc keeps them."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.runs_dir / f"{stamp}-{secrets.token_hex(3)}.json"
        write_json_atomic(path, {"name": name, "created": time.time(), "refs": refs, **(extra or {})})
        return path

    def run_records(self) -> list[dict[str, Any]]:
        """Every run record, oldest first."""
        return [json.loads(path.read_text()) for path in sorted(self.runs_dir.glob("*.json"))]

    def live_refs(self) -> set[str]:
        """Refs that gc keeps: those of the latest run of each config, and of every release."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self.run_records():
            latest[record["name"]] = record
        refs = {ref for record in latest.values() for ref in record["refs"].values()}
        for release in self.sync_releases().glob("*/release.json"):
            if release.parent.name.startswith("."):  # a release being built (.tmp-*): not one yet
                continue
            try:
                record = json.loads(release.read_text())
            except json.JSONDecodeError as err:  # stop rather than delete what that release came from
                raise StoreError(
                    f"{release}: unreadable ({err}); gc keeps every release's artifacts, so it stops here"
                ) from None
            # `lineage` names every artifact behind a published model, `refs` the ones it copied.
            refs.update(record.get("refs", {}).values())
            refs.update(record.get("lineage", {}).values())
        # Keep what kept artifacts were made from, so `ember show` can explain them.
        pending = list(refs)
        while pending:
            artifact = self.get(pending.pop())
            for ref in (artifact.manifest.get("inputs", {}) if artifact else {}).values():
                if ref not in refs:
                    refs.add(ref)
                    pending.append(ref)
        return refs

    def gc(self, dry_run: bool = False) -> list[str]:
        """Delete artifacts no run or release uses, and leftovers of crashed writers."""
        keep = self.live_refs()
        removed = []
        for artifact in self.ls():
            if artifact.ref not in keep:
                removed.append(artifact.ref)
                if not dry_run:
                    self.delete(artifact.ref)
        for name in self.incomplete():
            removed.append(name)
            if not dry_run:
                self._remove_incomplete(name)
        for folder in sorted((self.root / "tmp").glob("*")):
            if not _writer_alive(folder.name):
                removed.append(str(folder.relative_to(self.root)))
                if not dry_run:
                    shutil.rmtree(folder, ignore_errors=True)
        return removed


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that owns a tmp folder (`stage-key-pid-rand`) still runs."""
    parts = tmp_name.rsplit("-", 2)
    return len(parts) == 3 and process_alive(parts[1])


def process_alive(pid: str | int) -> bool:
    """Whether a process of this machine with this id runs (one of another user's counts)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
