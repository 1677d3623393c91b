"""download: sources (local files, http(s) files and archives, Hugging Face datasets) -> raw text shards.

Every source is read as a stream of documents; a long document is cut into chunks of at most
`chunk_chars` characters on paragraph boundaries, so that the filters downstream, written for
web-page-sized documents, see book chapters rather than whole books. A .txt or .md file is one
document and is streamed, so that a 100 MB file (even a single line) never sits in memory
whole. Each record keeps a stable id, `f"{source}/{relative_file}:{record_index}"` plus
`#chunkN` when its document was split.

The artifact:
- `shards/part-*.parquet`: `id, text, source`, what the next stages read.
- `metadata/part-00000.parquet`: `id, source, meta` for each document that has fields besides
  its text (a jsonl/json record's other keys, a Parquet/Arrow row's other columns, a dataset
  row's other fields), `meta` being those fields as a JSON object. `id` is the document's id:
  a chunk `X#chunkN` has the metadata of `X`.
- `problems.jsonl`: every bad record or file met and what was done with it (see `on_error`).

Bad input never passes silently: a record that is not JSON, lacks the text field or is not
UTF-8, and a file that is corrupt (gzip, zstd, Parquet), binary or not decodable, is either
an error naming the file and the line/record (`on_error: raise`, the default) or skipped,
counted in the metrics and listed in a table and in `problems.jsonl` (`on_error: skip`). In
skip mode, records read from a file before its damage (a truncated gzip) are kept. An empty
file is always a counted skip. A .txt/.md file that is not UTF-8 is read as cp1252/Latin-1
(old Project Gutenberg files) and counted, unless `encoding` names a codec.

`preflight` is the cheap part the flow runs before touching the store: it fails early on a
missing path or a file without the text field, and returns the identity of every source for
the stage key: the sha256 of each local file (so `touch` changes nothing and an edit reruns
download), a url's sha256 when given or else its ETag / Last-Modified / Content-Length.

The modules:
- `config`: `Source`, `DownloadConfig`, the errors, the supported file types, source naming.
- `listing`: which files a local source (or an unpacked archive) is made of.
- `readers`: a file's or a dataset's documents, one format reader each.
- `chunker`: long documents cut on paragraph boundaries, streaming.
- `preflight_checks`: `preflight` and the per-file sha256 cache (not named `preflight`, so that
  `download.preflight` is the function and the module never shadows it).
- `fetch`: url sources fetched, resumed, retried, verified; archives unpacked safely.
- `stage`: `run` and `STAGE`.
"""

from ember.tasks.download.chunker import chunk_text, iter_chunks
from ember.tasks.download.config import DownloadConfig, Source, SourceError
from ember.tasks.download.preflight_checks import preflight
from ember.tasks.download.stage import STAGE, run

__all__ = ["STAGE", "DownloadConfig", "Source", "SourceError", "chunk_text", "iter_chunks", "preflight", "run"]
