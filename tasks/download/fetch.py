"""Remote files for the download stage: fetched, resumed, retried, verified; archives unpacked safely.

Plain functions over urllib and the file system. The download stage fetches into its `ctx.work`
folder, which outlives a crash, so that a transfer cut by a crash or by the network resumes
where it stopped (an HTTP Range request) instead of starting over.

A fetch tries each location (mirror) in turn; within a location, a 5xx (or 429) answer, a
timeout or a cut connection is retried with exponential backoff, resuming what already
arrived. A 4xx answer, a refused connection or an unknown host moves on to the next location
at once. The file gets its final name only once complete and verified against `sha256` when
one is given; a mismatch deletes it.
"""

from __future__ import annotations

import http.client as http_client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from hashlib import sha256 as _sha256
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field

from ember.storage.store import file_sha256

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
BLOCK = 1 << 16

log = logging.getLogger("ember.download")


class FetchError(ValueError):
    """A location that cannot be fetched, a checksum mismatch or an unsafe archive."""


class HttpConfig(BaseModel):
    """How hard a url is tried. None of it changes what is downloaded, so it stays out of the key."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(5, ge=1, le=50, description="tries per location; 5xx, timeouts and cut transfers are retried")
    timeout_s: float = Field(60.0, gt=0, description="seconds without data before a try counts as timed out")
    backoff_s: float = Field(1.0, ge=0, description="wait before the second try; doubled before each further one")
    max_backoff_s: float = Field(60.0, ge=0, description="longest wait between two tries")


class _Cut(Exception):
    """The server closed the connection before the announced length arrived."""


def url_file_name(url: str) -> str:
    return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"


def fetch(urls: list[str], dest_dir: Path, sha256: str | None = None, http: HttpConfig | None = None) -> Path:
    """The file at the first location of `urls` that works, as `dest_dir/<name>`.

    Raises FetchError naming each location and why it failed. Nothing but the verified file
    is left in `dest_dir` on success, nothing at all on a checksum mismatch.
    """
    http = http or HttpConfig()
    name = url_file_name(urls[0])
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    if dest.exists() and (sha256 is None or file_sha256(dest) == sha256.lower()):
        return dest  # completed before a crash: ctx.work outlives one, and the key pins the identity
    failures = []
    for url in urls:
        # One partial file per location: bytes from two servers are never spliced together.
        part = dest_dir / f"{_sha256(url.encode()).hexdigest()[:12]}.part"
        try:
            _download(url, part, http)
            if sha256 and (got := file_sha256(part)) != sha256.lower():
                _discard(part)
                raise FetchError(f"sha256 mismatch: expected {sha256.lower()}, got {got}; file discarded")
        except FetchError as err:
            failures.append((url, str(err)))
            if len(urls) > 1:
                log.warning("%s failed: %s; trying the next location", url, err)
            continue
        os.replace(part, dest)
        _validator_path(part).unlink(missing_ok=True)
        if failures:
            log.info("fetched %s after %d failed location(s)", url, len(failures))
        return dest
    if len(urls) == 1:
        raise FetchError(failures[0][1])
    raise FetchError(f"all {len(urls)} locations failed: " + "; ".join(f"{u}: {why}" for u, why in failures))


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


def _download(url: str, part: Path, http: HttpConfig) -> None:
    """Bring `part` to the complete content of `url`, resuming what it already holds."""
    last = ""
    for attempt in range(1, http.attempts + 1):
        if attempt > 1:
            wait = min(http.backoff_s * 2 ** (attempt - 2), http.max_backoff_s)
            log.warning("%s: try %d/%d failed: %s; retrying in %.1fs", url, attempt - 1, http.attempts, last, wait)
            time.sleep(wait)
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "ember", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            validator = _read_validator(part)
            if validator:  # the server sends the whole file instead if it changed meanwhile
                headers["If-Range"] = validator
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=http.timeout_s) as resp:
                if resp.status == 206 and (not have or _range_start(resp.headers.get("Content-Range")) != have):
                    _discard(part)  # a part we did not ask for: start over
                    raise _Cut(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
                if have and resp.status == 206:
                    mode = "ab"
                else:
                    have, mode = 0, "wb"
                    _write_validator(part, resp.headers)
                expected = resp.headers.get("Content-Length")
                received = 0
                with open(part, mode) as out:
                    # read1: what has arrived, so a stalled transfer keeps every byte it got
                    while block := resp.read1(BLOCK):
                        out.write(block)
                        received += len(block)
                # urllib returns b"" on a closed connection rather than raising: check the length.
                if expected is not None and expected.isdigit() and received < int(expected):
                    raise _Cut(f"connection closed after {have + received} of {have + int(expected)} bytes")
            return
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                total = (err.headers.get("Content-Range") or "").rpartition("/")[2]
                if total.isdigit() and int(total) == have:
                    return  # the partial file was complete already
                _discard(part)
                last = "HTTP 416 on resume: starting over"
                continue
            if err.code not in RETRY_STATUS:
                raise FetchError(f"HTTP {err.code} {err.reason}") from None
            last = f"HTTP {err.code} {err.reason}"
        except urllib.error.URLError as err:
            reason = err.reason
            if not isinstance(reason, (TimeoutError, ConnectionResetError)):
                raise FetchError(f"{reason}") from None  # refused, unknown host, TLS: another try won't help
            last = f"{reason}"
        except TimeoutError:  # socket.timeout is TimeoutError
            last = f"timed out: no data for {http.timeout_s}s"
        except (_Cut, ConnectionError, http_client.HTTPException) as err:
            last = f"{type(err).__name__}: {err}" if not isinstance(err, _Cut) else str(err)
    raise FetchError(f"{last} (after {http.attempts} tries)")


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


def _write_validator(part: Path, headers: http_client.HTTPMessage) -> None:
    etag = headers.get("ETag")
    value = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    path = _validator_path(part)
    if value:
        path.write_text(json.dumps({"if_range": value}))
    else:
        path.unlink(missing_ok=True)


def _read_validator(part: Path) -> str | None:
    try:
        value: str = json.loads(_validator_path(part).read_text())["if_range"]  # as _write_validator wrote it
        return value
    except (OSError, ValueError, KeyError):
        return None


def head(url: str, timeout: float = 10.0) -> dict[str, str | int | None]:
    """ETag, Content-Length and Last-Modified of `url`; {"status": code} for an HTTP error; {} when unreachable."""
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ember"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return {
                "etag": response.headers.get("ETag"),
                "length": response.headers.get("Content-Length"),
                "last_modified": response.headers.get("Last-Modified"),
            }
    except urllib.error.HTTPError as err:
        return {"status": err.code}
    except (urllib.error.URLError, TimeoutError, ConnectionError, http_client.HTTPException):
        return {}


# ---------------------------------------------------------------------------------------------
# Archives


def archive_suffix(name: str) -> str | None:
    name = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if name.endswith(s)), None)


def unpack(archive: Path, target: Path, room: int | None = None) -> Path:
    """Unpack a .tar(.gz)/.tgz/.zip into `target` (made afresh), refusing any entry that would
    land outside it (an absolute path, a `..` component, a link pointing out, a device file) and
    an archive whose entries add up to more than `room` bytes (default: the free space where
    `target` goes), as a zip bomb would, before anything is written."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.mkdir(parents=True)
    if room is None:
        room = shutil.disk_usage(tmp).free
    try:
        if archive.name.lower().endswith(".zip"):
            _unzip(archive, tmp, room)
        else:
            _untar(archive, tmp, room)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"{archive.name}: not a readable archive: {err}") from None
    except FetchError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, target)
    return target


def _check_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise FetchError(f"{archive.name}: entry {name!r} has an absolute path; refusing to unpack the archive")
    if ".." in path.parts:
        raise FetchError(
            f"{archive.name}: entry {name!r} would land outside the target folder ('..'); "
            "refusing to unpack the archive"
        )


def _check_link(archive: Path, name: str, target: str, relative_to_entry: bool) -> None:
    """A link's target, resolved inside the archive, must stay inside it."""
    if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target):
        raise FetchError(
            f"{archive.name}: entry {name!r} links to {target!r}, outside the target folder; "
            "refusing to unpack the archive"
        )
    base = PurePosixPath(name).parent if relative_to_entry else PurePosixPath(".")
    depth = 0
    for part in (base / target.replace("\\", "/")).parts:
        depth += -1 if part == ".." else 0 if part in (".", "") else 1
        if depth < 0:
            raise FetchError(
                f"{archive.name}: entry {name!r} links to {target!r}, outside the target folder; "
                "refusing to unpack the archive"
            )


def _check_room(archive: Path, folder: Path, sizes: list[int], room: int) -> None:
    """Entry sizes are what extraction writes: a tar's are exact, and zipfile refuses an entry
    whose data inflates past its declared size. So the sum is checked before a byte is written."""
    total = sum(sizes)
    if total > room:
        raise FetchError(
            f"{archive.name}: its entries unpack to {total:,} bytes, more than the {room:,} bytes "
            f"free at {folder.parent}; refusing to unpack (a zip bomb, or too little disk space)"
        )


def _untar(archive: Path, folder: Path, room: int) -> None:
    with tarfile.open(archive) as tar:  # compression detected from the content
        members = tar.getmembers()
        _check_room(archive, folder, [m.size for m in members if m.isfile()], room)
        for member in members:
            _check_name(archive, member.name)
            if member.issym() or member.islnk():
                _check_link(archive, member.name, member.linkname, relative_to_entry=member.issym())
            elif not (member.isfile() or member.isdir()):
                raise FetchError(f"{archive.name}: entry {member.name!r} is a device or fifo; refusing to unpack")
        # The "data" filter checks the same again inside tarfile, and drops unsafe modes.
        tar.extractall(folder, members=members, filter="data")


def _unzip(archive: Path, folder: Path, room: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        entries = zf.infolist()
        _check_room(archive, folder, [info.file_size for info in entries], room)
        for info in entries:
            _check_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                _check_link(archive, info.filename, zf.read(info).decode("utf-8", "replace"), relative_to_entry=True)
        for info in entries:
            # zipfile would write a link as a small file holding its target path: leave links out.
            if not stat.S_ISLNK(info.external_attr >> 16):
                zf.extract(info, folder)
