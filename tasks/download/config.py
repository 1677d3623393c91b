"""The download stage's config (`Source`, `DownloadConfig`), its errors, the file types it reads,
and how a source and its files are named (what record ids are made of)."""

from __future__ import annotations

import codecs
import re
import urllib.parse
from itertools import takewhile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.tasks.download import fetch
from ember.tasks.download.fetch import HttpConfig

TEXT_FORMATS = (".txt", ".md")
JSON_FORMATS = (".jsonl", ".json")
TABLE_FORMATS = (".parquet", ".arrow", ".feather")  # .arrow: Arrow IPC, file or stream
COMPRESSIONS = (".gz", ".zst")
# Longest suffix first: ".jsonl.gz" must win over ".gz".
SUPPORTED_SUFFIXES = tuple(
    sorted(
        [f + c for f in TEXT_FORMATS + JSON_FORMATS for c in ("", *COMPRESSIONS)] + list(TABLE_FORMATS),
        key=len,
        reverse=True,
    )
)
SUPPORTED = ".txt .md .jsonl .json (each also .gz or .zst), .parquet, .arrow, .feather"
GLOB_CHARS = re.compile(r"[*?\[]")
ErrorMode = Literal["raise", "skip"]


class SourceError(ValueError):
    """A source that cannot be read; the message names the config key, the file and the line."""


class BadInput(SourceError):
    """A bad record or file: `where` is "line N", "record N", "byte N" or "file"."""

    def __init__(self, path: Path | str, where: str, reason: str):
        super().__init__(f"{path}: {where}: {reason}")
        self.path, self.where, self.reason = str(path), where, reason


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None,
        pattern=r"^[^/\s]+$",
        description="names the records' `source` and id prefix; default: the folder, file or dataset name",
    )
    path: str | None = Field(None, description="a file, a folder (searched recursively) or a glob")
    url: str | list[str] | None = Field(
        None, description="an http(s) file or .tar.gz/.tgz/.zip archive; a list: mirrors of one file, tried in order"
    )
    hf: str | None = Field(None, description="a Hugging Face dataset name or a local dataset folder")
    hf_config: str | None = Field(None, description="the dataset's config (subset) name")
    hf_split: str = Field("train", description="the dataset split to read")
    text_field: str = Field(
        "text", min_length=1, description="field (json, hf) or column (parquet, arrow) holding the text"
    )
    metadata: bool | list[str] = Field(
        True, description="other fields kept as metadata: all (true), none (false) or these"
    )
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents of this source")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="expected digest of the url's file")
    on_error: ErrorMode | None = Field(None, description="bad records and files: raise or skip; default: the stage's")
    encoding: str = Field(
        "auto", description=".txt/.md encoding; auto: UTF-8, else cp1252/Latin-1 (counted); a codec name: strict"
    )
    # A dataset card or a licence next to the data is not training text: "SOURCE.md" beside the
    # jsonl files of a corpus folder would otherwise become a document. A file named
    # explicitly in `path` is always read.
    exclude: list[str] = Field(
        ["README.md", "SOURCE.md", "LICENSE*", "CHANGELOG*"],
        description="file-name patterns skipped when searching a folder, glob or archive",
    )

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value != "auto":
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        given = [key for key in ("path", "url", "hf") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, url, hf (got {', '.join(given) or 'none'})")
        for url in self.urls:
            if urllib.parse.urlparse(url).scheme not in ("http", "https"):
                raise ValueError(f"url must be http:// or https://, got {url!r}")
        if self.sha256 and not self.url:
            raise ValueError("sha256 checks a url download; it is not used with path or hf")
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url or [])

    @property
    def location(self) -> str:
        return self.path or (self.urls[0] if self.url else "") or self.hf or ""

    def source_name(self) -> str:
        if self.name:
            return self.name
        if self.url:
            return _strip_suffix(fetch.url_file_name(self.urls[0])) or "url"
        if self.hf:
            return self.hf.rstrip("/").replace("\\", "/").split("/")[-1] or "hf"
        # A single file is named after its folder ("tinyshakespeare/input.txt:0"), which says
        # more than a generic file name and keeps the relative path in the id.
        return _path_base(self.path or "").name or "source"


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[Source] = Field(..., min_length=1, description="where the text comes from")
    chunk_chars: int = Field(
        4000,
        ge=100,
        description="longer documents are split on paragraph boundaries into chunks of at most this many characters",
    )
    min_chars: int = Field(1, ge=0, description="documents (and chunks) with fewer non-blank characters are skipped")
    on_error: ErrorMode = Field(
        "raise", description="bad records and files: raise (stop, naming them) or skip (count, list)"
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="retries and timeouts of url sources")

    @model_validator(mode="after")
    def _unique_names(self) -> DownloadConfig:
        names = [source.source_name() for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"sources share the name {', '.join(duplicates)}: give each a distinct `name` so ids stay unique"
            )
        return self


# ---------------------------------------------------------------------------------------------
# File types and names


def _strip_suffix(name: str) -> str:
    for suffix in SUPPORTED_SUFFIXES + fetch.ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def file_format(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix)), None)


def _path_base(path: str) -> Path:
    """The folder that relative file names (in ids) are taken from."""
    if GLOB_CHARS.search(path):
        fixed = list(takewhile(lambda part: not GLOB_CHARS.search(part), Path(path).parts))
        return Path(*fixed) if fixed else Path(".")
    # Decided by the name rather than by what is on disk, so that a source keeps its name
    # (and its ids) whether or not the file exists when the config is read.
    p = Path(path)
    return p.parent if file_format(p) and not p.is_dir() else p
