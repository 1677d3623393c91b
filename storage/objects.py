"""The store on any fsspec filesystem: `s3://bucket/ember`, `gs://...`, a folder every machine mounts.

The artifacts live there, under the same layout and keys as a local store, and are committed the
same way: every file first, `manifest.json` last, so an artifact without its manifest does not
exist, whatever killed its writer. Each machine keeps a local cache (`$EMBER_CACHE`, else
`~/.cache/ember/<hash of the URL>`): stages read an input artifact from the cache, fetched whole
and checked against the manifest's sha256s the first time it is needed, and write their output to
a local folder that is uploaded on commit. An artifact never changes once its manifest exists, so
a cached copy is valid for as long as its digest matches the manifest's.

Why a cache and not stages reading the object store directly: tokenizers, safetensors, torch and
pyarrow's memory maps all want local files, training reads its token shards many times over, and a
stage's code stays the same on a laptop and on a cluster. What the cache costs is disk on each
machine: each of them holds the artifacts it used.

Locks hold across machines through a conditional create of a lock object (`If-None-Match: *`,
which AWS S3, SeaweedFS and MinIO honour): exactly one writer gets to create
`locks/<stage>-<key>.lock`. The holder rewrites it every `HEARTBEAT_S`; a lock not rewritten for
`STALE_S` belongs to a dead writer and is broken. Chosen over a Prefect global concurrency limit
because it needs nothing but the store: `ember run` on a laptop (a temporary Prefect server),
Dask workers and torchrun nodes all see the same lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.storage.releases import HISTORY, LATEST, RELEASE_JSON, VERSION_RE, current_version, list_versions
from ember.storage.store import (
    MANIFEST,
    Artifact,
    LockTimeout,
    Store,
    StoreError,
    file_sha256,
    make_ref,
    process_alive,
    read_json_or_none,
    split_ref,
    write_json_atomic,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger("ember.store")
CACHE_ENV = "EMBER_CACHE"
HEARTBEAT_S = 15.0
STALE_S = 120.0  # a lock not rewritten for this long is a dead writer's


def is_url(location: str | Path) -> bool:
    """A location fsspec opens remotely (`s3://...`); `file://` and plain paths are local folders."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def open_store(location: str | Path, lock_timeout_s: float = 3600.0, cache: str | Path | None = None) -> Store:
    """A `Store` for a folder, or an `ObjectStore` for a URL."""
    if is_url(location):
        return ObjectStore(str(location), lock_timeout_s=lock_timeout_s, cache=cache)
    text = str(location)
    return Store(Path(text[len("file://") :] if text.startswith("file://") else text), lock_timeout_s=lock_timeout_s)


def default_cache(url: str) -> Path:
    base = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else Path.home() / ".cache" / "ember"
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


class ObjectStore(Store):
    """A `Store` whose artifacts, run records and locks live at `url` (any fsspec filesystem), with
    a local cache at `root` for the files stages read and write."""

    fs: AbstractFileSystem  # the store's filesystem (S3, GCS, ...), as fsspec opened `url`
    remote: str  # the store's path inside `fs` (`bucket/prefix`)

    def __init__(
        self, url: str, lock_timeout_s: float = 3600.0, cache: str | Path | None = None, **storage_options: Any
    ):
        import fsspec

        self.url = url.rstrip("/")
        if self.url.split("://")[0] in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
            # Several machines write the store: a listing cached here would hide their artifacts.
            storage_options.setdefault("use_listings_cache", False)
        self.fs, self.remote = fsspec.core.url_to_fs(self.url, **storage_options)
        self.remote = self.remote.rstrip("/")
        super().__init__(Path(cache) if cache else default_cache(self.url), lock_timeout_s)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return self.url

    def remote_path(self, *parts: str) -> str:
        """A path in the store's filesystem (`bucket/prefix/...`, as `self.fs` takes it)."""
        return "/".join([self.remote, *parts])

    def _remote_artifact(self, ref: str) -> str:
        stage, key = split_ref(ref)
        return self.remote_path("artifacts", stage, key)

    # -- reading ------------------------------------------------------------------------------

    def get(self, ref: str) -> Artifact | None:
        """The complete artifact for `ref` (its manifest read from the object store), or None. Its
        `path` is the local cache's folder, filled by `require`."""
        try:
            raw = self.fs.cat_file(f"{self._remote_artifact(ref)}/{MANIFEST}")
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as err:
            raise StoreError(
                f"{self.url}/artifacts/{ref}/{MANIFEST}: corrupt manifest ({err}); run `ember verify`"
            ) from err
        return Artifact(ref=ref, path=self.path(ref), manifest=manifest)

    def require(self, ref: str) -> Artifact:
        """The artifact, with its files in the local cache (fetched and checked the first time)."""
        artifact = super().require(ref)
        self._fetch(artifact)
        return artifact

    def _fetch(self, artifact: Artifact) -> None:
        def cached() -> bool:
            local = read_json_or_none(artifact.path / MANIFEST) or {}
            return bool(local.get("digest") == artifact.manifest["digest"])

        if cached():
            return
        tmp = self.root / "tmp" / f"fetch-{artifact.ref.replace('/', '-')[:40]}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            remote = self._remote_artifact(artifact.ref)
            for rel, meta in artifact.manifest.get("files", {}).items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{remote}/{rel}", str(target))
                if target.stat().st_size != meta["size"] or file_sha256(target) != meta["sha256"]:
                    raise StoreError(
                        f"{self.url}/artifacts/{artifact.ref}/{rel} does not match its manifest; run `ember verify`"
                    )
            write_json_atomic(tmp / MANIFEST, artifact.manifest)
            # Another process of this machine may have fetched it meanwhile: either copy will do.
            # (Checkpoints this machine kept for the same artifact go: it is complete.)
            if not cached():
                self._place(tmp, artifact.ref)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _manifests(self) -> dict[str, dict[str, Any]]:
        paths = self.fs.glob(self.remote_path("artifacts", "*", "*", MANIFEST))
        found: dict[str, dict[str, Any]] = {}
        for path, raw in (self.fs.cat(paths) if paths else {}).items():
            stage, key = path.rstrip("/").split("/")[-3:-1]
            if len(key) == 64:
                found[make_ref(stage, key)] = json.loads(raw)
        return found

    def ls(self, stage: str | None = None) -> list[Artifact]:
        found = [
            Artifact(ref=ref, path=self.path(ref), manifest=manifest)
            for ref, manifest in self._manifests().items()
            if stage is None or ref.split("/")[0] == stage
        ]
        return sorted(found, key=lambda a: a.manifest.get("created", 0))

    # -- writing ------------------------------------------------------------------------------

    @contextmanager
    def lock(self, ref: str, timeout_s: float | None = None) -> Iterator[None]:
        stage, key = split_ref(ref)
        lock = ObjectLock(self.fs, self.remote_path("locks", f"{stage}-{key}.lock"))
        timeout = self.lock_timeout_s if timeout_s is None else timeout_s
        if not lock.acquire(timeout):
            raise LockTimeout(
                f"artifact {ref} is being written by another run ({lock.holder()}; lock "
                f"{self.url}/locks/{stage}-{key}.lock); gave up after {timeout:.0f}s"
            )
        try:
            yield
        finally:
            lock.release()

    def _commit(self, tmp: Path, ref: str, manifest: dict[str, Any], started: float) -> None:
        full = self._seal(tmp, ref, manifest, started)
        remote = self._remote_artifact(ref)
        # A forced rebuild replaces an artifact: its manifest goes first, so that nobody reads the
        # old manifest over new files.
        if self.fs.exists(f"{remote}/{MANIFEST}"):
            self.fs.rm_file(f"{remote}/{MANIFEST}")
        for rel in full["files"]:
            self.fs.put_file(str(tmp / rel), f"{remote}/{rel}")
        self.fs.put_file(str(tmp / MANIFEST), f"{remote}/{MANIFEST}")  # last: now it exists
        self._place(tmp, ref)

    def record_run(self, name: str, refs: dict[str, str], extra: dict[str, Any] | None = None) -> Path:
        path = super().record_run(name, refs, extra)
        self.fs.put_file(str(path), self.remote_path("runs", path.name))
        return path

    def run_records(self) -> list[dict[str, Any]]:
        paths = sorted(self.fs.glob(self.remote_path("runs", "*.json")))
        return [json.loads(raw) for _, raw in sorted((self.fs.cat(paths) if paths else {}).items())]

    # -- releases -----------------------------------------------------------------------------
    # Remote layout: releases/vNNNN/ (release.json uploaded last: a version without it is not one
    # yet), releases/LATEST (the served version, as text: object stores have no symlinks) and
    # releases/history.jsonl. The local cache holds the same as a local store's releases/.

    @contextmanager
    def releases_lock(self) -> Iterator[None]:
        lock = ObjectLock(self.fs, self.remote_path("locks", "releases.lock"))
        if not lock.acquire(self.lock_timeout_s):
            raise LockTimeout(
                f"the releases of {self.url} are being published by {lock.holder()}; "
                f"gave up after {self.lock_timeout_s:.0f}s"
            )
        try:
            yield
        finally:
            lock.release()

    def _remote_versions(self) -> list[str]:
        found = {
            path.rstrip("/").split("/")[-2] for path in self.fs.glob(self.remote_path("releases", "v*", RELEASE_JSON))
        }
        return sorted(v for v in found if VERSION_RE.match(v))

    def sync_releases(self) -> Path:
        local = self.releases_dir
        local.mkdir(parents=True, exist_ok=True)
        have = set(list_versions(local))
        for version in self._remote_versions():
            if version in have:
                continue  # a release never changes once written
            tmp = local / f".fetch-{version}-{secrets.token_hex(4)}"
            self.fs.get(self.remote_path("releases", version) + "/", str(tmp), recursive=True)
            if (tmp / RELEASE_JSON).is_file() and not (local / version).exists():
                os.rename(tmp, local / version)
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            latest = self.fs.cat_file(self.remote_path("releases", "LATEST")).decode().strip()
        except FileNotFoundError:
            latest = None
        if latest and (local / latest).is_dir() and current_version(local) != latest:
            tmp_link = local / f".latest-{secrets.token_hex(4)}"
            os.symlink(latest, tmp_link)
            os.replace(tmp_link, local / LATEST)
        if self.fs.exists(self.remote_path("releases", HISTORY)):
            self.fs.get_file(self.remote_path("releases", HISTORY), str(local / HISTORY))
        return local

    def follow_releases(self, every_s: float = 60.0) -> None:
        """Fetch new releases and `latest` every `every_s` in a daemon thread: the demo serves the
        local copy and picks a new `latest` up at its next generation."""

        def follow() -> None:
            while True:
                time.sleep(every_s)
                try:
                    self.sync_releases()
                except Exception as err:  # noqa: BLE001  (the demo goes on with what it has)
                    log.warning("could not fetch releases from %s: %s", self.url, err)

        threading.Thread(target=follow, name="ember-releases", daemon=True).start()

    def push_releases(self) -> None:
        local = self.releases_dir
        remote_versions = set(self._remote_versions())
        for version in list_versions(local):
            if version in remote_versions:
                continue
            files = sorted(p for p in (local / version).rglob("*") if p.is_file())
            for path in sorted(files, key=lambda p: p.name == RELEASE_JSON):  # release.json last
                self.fs.put_file(
                    str(path), self.remote_path("releases", version, path.relative_to(local / version).as_posix())
                )
        if (local / HISTORY).is_file():
            self.fs.put_file(str(local / HISTORY), self.remote_path("releases", HISTORY))
        latest = current_version(local)
        if latest:
            self.fs.pipe_file(self.remote_path("releases", "LATEST"), latest.encode())

    # -- maintenance --------------------------------------------------------------------------

    def delete(self, ref: str) -> None:
        remote = self._remote_artifact(ref)
        with self.lock(ref):
            if self.fs.exists(f"{remote}/{MANIFEST}"):
                self.fs.rm_file(f"{remote}/{MANIFEST}")
            if self.fs.exists(remote):
                self.fs.rm(remote, recursive=True)
            shutil.rmtree(self.path(ref), ignore_errors=True)

    def verify(self) -> list[str]:
        """Every artifact's objects against its manifest: present, the size, the sha256 (read back)."""
        problems = []
        for artifact in self.ls():
            remote = self._remote_artifact(artifact.ref)
            for rel, meta in artifact.manifest.get("files", {}).items():
                try:
                    size = self.fs.size(f"{remote}/{rel}")
                except FileNotFoundError:
                    problems.append(f"{artifact.ref}: missing {rel}")
                    continue
                if size != meta["size"]:
                    problems.append(f"{artifact.ref}: {rel} has {size} bytes, manifest says {meta['size']}")
                elif _remote_sha256(self.fs, f"{remote}/{rel}") != meta["sha256"]:
                    problems.append(f"{artifact.ref}: {rel} checksum differs from the manifest")
        problems += [f"{name}: incomplete (no manifest); gc removes it" for name in self.incomplete()]
        return problems

    def incomplete(self) -> list[str]:
        """Artifact folders holding objects but no manifest (a writer died while uploading). An
        empty folder is nothing: some object stores keep one after its objects are deleted."""
        base = self.remote_path("artifacts") + "/"
        folders = {"/".join(path[len(base) :].split("/")[:2]) for path in self.fs.find(base.rstrip("/"))}
        complete = set(self._manifests())
        return [f"artifacts/{name}" for name in sorted(folders) if name.count("/") == 1 and name not in complete]

    def _remove_incomplete(self, name: str) -> None:
        self.fs.rm(self.remote_path(name), recursive=True)


class ObjectLock:
    """A lock that holds across machines: one object, created only if absent (If-None-Match)."""

    def __init__(self, fs: AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "time": time.time()}).encode()

    def holder(self) -> str:
        try:
            owner: str = json.loads(self.fs.cat_file(self.path)).get("owner", "?")
            return owner
        except (FileNotFoundError, json.JSONDecodeError):
            return "nobody now"

    def _try_create(self) -> bool:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._body())
            return True
        except (FileExistsError, OSError) as err:
            if (
                isinstance(err, FileExistsError)
                or "pre-condition" in str(err).lower()
                or "precondition" in str(err).lower()
            ):
                return False
            raise

    def _stale(self) -> bool:
        """Whether the lock's writer is dead: a process of this machine that no longer runs (a
        run killed here a moment ago), or a lock nobody has rewritten for STALE_S."""
        try:
            body = json.loads(self.fs.cat_file(self.path))
            modified = self.fs.info(self.path).get("LastModified") or self.fs.modified(self.path)
        except FileNotFoundError:
            return False
        except json.JSONDecodeError:
            body = {}
        host, _, rest = str(body.get("owner", "")).partition(":")
        if host == socket.gethostname() and not process_alive(rest.partition(":")[0]):
            return True
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
        return time.time() - stamp > STALE_S

    def acquire(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        wait = 0.2
        while True:
            if self._try_create():
                self._beat = threading.Thread(target=self._heartbeat, name="ember-lock", daemon=True)
                self._beat.start()
                return True
            if self._stale():
                # Its writer died (kill -9, a lost machine) without releasing it.
                try:
                    self.fs.rm_file(self.path)
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(wait * 2, 5.0)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if json.loads(self.fs.cat_file(self.path)).get("owner") == self.owner:
                    self.fs.pipe_file(self.path, self._body())
            except Exception:  # noqa: BLE001  (a missed beat is retried; STALE_S allows several)
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.fs.cat_file(self.path)).get("owner") == self.owner:
                self.fs.rm_file(self.path)
        except (FileNotFoundError, json.JSONDecodeError):
            pass


def _remote_sha256(fs: AbstractFileSystem, path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
