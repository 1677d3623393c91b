"""Which files a local source is made of: a file, a folder searched recursively, a glob, or the
folder an archive was unpacked into; in a stable order, with the files passed over."""

from __future__ import annotations

import fnmatch
import glob
from dataclasses import dataclass, field
from pathlib import Path

from ember.tasks.download.config import GLOB_CHARS, SUPPORTED, Source, SourceError, _path_base, file_format


@dataclass
class FileList:
    base: Path
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)


def list_files(source: Source, index: int, folder: Path | None = None) -> FileList:
    """The supported files of a local `path` source (or of an unpacked archive's `folder`) in a
    stable order, or a SourceError."""
    key = f"download.sources[{index}].{'url' if folder else 'path'}"
    path = str(folder) if folder else source.path or ""
    base = Path(path) if folder else _path_base(path)
    if GLOB_CHARS.search(path) and not folder:
        candidates = sorted(Path(p) for p in glob.glob(path, recursive=True))
        if not candidates:
            raise SourceError(f"{key}: no file matches {path}")
    elif Path(path).is_file():
        if file_format(path) is None:
            raise SourceError(f"{key}: {path}: unsupported file type (supported: {SUPPORTED})")
        return FileList(Path(path).parent, [Path(path)])
    elif Path(path).is_dir():
        candidates = sorted(p for p in Path(path).rglob("*"))
    else:
        raise SourceError(f"{key}: {path} does not exist")
    files, skipped = [], []
    for candidate in candidates:
        rel = candidate.relative_to(base) if candidate.is_relative_to(base) else candidate
        if not candidate.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # folders themselves, and hidden files such as a .cache/ of datasets
        if file_format(candidate) is None or any(fnmatch.fnmatch(candidate.name, pat) for pat in source.exclude):
            skipped.append(candidate)
        else:
            files.append(candidate)
    if not files:
        where = source.location if folder else path
        raise SourceError(f"{key}: {where} holds no supported file ({SUPPORTED}); {len(skipped)} other file(s) skipped")
    return FileList(base, files, skipped)
