"""`ember audit DOC_ID`: what happened to one document, in every artifact and run that saw it.

It follows the document through the store, artifact by artifact, along the inputs recorded in
the manifests: the download artifacts that hold it (source and file come from the id,
`source/file:record[#chunkN]`), the normalize artifacts made from those (changed or not), the
filter artifacts made from those (kept, or removed by which rule with its value and threshold,
and which of its lines were dropped), the dedup artifacts made from those (kept, or dropped as
a duplicate of which document, from `clusters.jsonl`), and the pipeline runs (`runs/`) that used
any of these artifacts. Nothing is recomputed: every answer is read from what the stages wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ember.storage.shards import list_shards
from ember.storage.store import Artifact, Store


def _rows(folder: Path, ids: list[str], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of the shards in `folder` whose id is one of `ids`, in shard order."""
    found: list[dict[str, Any]] = []
    for path in list_shards(folder):
        table = pq.read_table(path, columns=columns, filters=[("id", "in", ids)])
        found += table.to_pylist()
    return found


def _matching_ids(folder: Path, doc_id: str) -> list[str]:
    """`doc_id` itself, or, for a document the download stage split, the ids of its chunks."""
    exact: list[str] = []
    chunks: list[str] = []
    for path in list_shards(folder):
        column = pq.read_table(path, columns=["id"]).column("id")
        if pc.any(pc.equal(column, pa.scalar(doc_id))).as_py():
            exact.append(doc_id)
        matches = pc.filter(column, pc.starts_with(column, doc_id + "#chunk"))
        chunks += [i for i in matches.to_pylist() if i is not None]  # none is: `filter` drops null ids
    return exact or chunks


def _children(store: Store, stage: str, ref: str) -> list[Artifact]:
    """The artifacts of `stage` made from the artifact `ref`."""
    return [a for a in store.ls(stage) if ref in a.manifest.get("inputs", {}).values()]


def _describe_id(doc_id: str) -> dict[str, Any]:
    # Ids are `source/relative_file:record` plus `#chunkN` (tasks/download/).
    base, _, chunk = doc_id.partition("#chunk")
    source, _, rest = base.partition("/")
    file, _, record = rest.rpartition(":")
    return {
        "source": source,
        "file": file or rest,
        "record": record if file else "",
        "chunk": int(chunk) if chunk.isdigit() else None,
    }


def _dedup_entry(artifact: Artifact, doc_id: str) -> dict[str, Any] | None:
    """The line of clusters.jsonl that removed `doc_id`, in either layout dedup has written:
    one line per removed document (`id`, `kept_id`, `kind`), or one per cluster (`kept`, `removed`)."""
    path = artifact.path / "clusters.jsonl"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if doc_id not in line:  # cheap pre-test before parsing
                continue
            entry: dict[str, Any] = json.loads(line)
            if entry.get("id") == doc_id:
                return entry
            if doc_id in entry.get("removed", ()):
                return {
                    "id": doc_id,
                    "kept_id": entry.get("kept"),
                    "kind": entry.get("kind"),
                    "jaccard": entry.get("similarity"),
                }
    return None


def _runs(store: Store) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in sorted(store.runs_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run record being written; the others still answer
        runs.append({"file": path.name, **record})
    return runs


def audit_document(store: Store, doc_id: str) -> dict[str, Any]:
    """Everything the store knows about `doc_id` (or the chunks of it), as plain data."""
    runs = _runs(store)
    report: dict[str, Any] = {"doc_id": doc_id, "store": store.location, "found": False, "documents": []}
    for download in store.ls("download"):
        ids = _matching_ids(download.path / "shards", doc_id)
        for one in ids:
            report["found"] = True
            report["documents"].append(_follow(store, download, one, runs))
    return report


def _follow(store: Store, download: Artifact, doc_id: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    (raw,) = _rows(download.path / "shards", [doc_id])[:1] or [{}]
    text = raw.get("text") or ""
    doc: dict[str, Any] = {
        "id": doc_id,
        **_describe_id(doc_id),
        "download": {"ref": download.ref, "chars": len(text)},
        "paths": [],
    }
    refs_seen = {download.ref}
    # A download no normalize artifact was made from still gets its path, empty.
    normalizes: list[Artifact | None] = [*_children(store, "normalize", download.ref)] or [None]
    for normalize in normalizes:
        path: dict[str, Any] = {"normalize": None, "filter": None, "dedup": None}
        doc["paths"].append(path)
        if normalize is None:
            continue
        refs_seen.add(normalize.ref)
        (after,) = _rows(normalize.path / "shards", [doc_id], ["id", "text"])[:1] or [{}]
        normalized = after.get("text")
        path["normalize"] = {
            "ref": normalize.ref,
            "changed": normalized is not None and normalized != text,
            "chars": len(normalized or ""),
        }
        for flt in _children(store, "filter", normalize.ref):
            if path["filter"] is not None:  # another filter config: a path of its own
                path = {"normalize": path["normalize"], "filter": None, "dedup": None}
                doc["paths"].append(path)
            refs_seen.add(flt.ref)
            path["filter"] = _filter_outcome(flt, doc_id)
            if path["filter"]["outcome"] != "kept":
                continue
            for dedup in _children(store, "dedup", flt.ref):
                refs_seen.add(dedup.ref)
                entry = _dedup_entry(dedup, doc_id)
                path["dedup"] = (
                    {"ref": dedup.ref, "outcome": "kept"}
                    if entry is None
                    else {
                        "ref": dedup.ref,
                        "outcome": "duplicate",
                        "kept_id": entry.get("kept_id"),
                        "kind": entry.get("kind"),
                        "jaccard": entry.get("jaccard"),
                    }
                )
    doc["runs"] = [
        {
            "name": r.get("name"),
            "file": r["file"],
            "flow_run_id": r.get("flow_run_id", ""),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.get("created", 0))),
            "stages": sorted(stage for stage, ref in r.get("refs", {}).items() if ref in refs_seen),
        }
        for r in runs
        if refs_seen & set(r.get("refs", {}).values())
    ]
    return doc


def _filter_outcome(artifact: Artifact, doc_id: str) -> dict[str, Any]:
    lines = [
        {"line": r["line"], "rule": r["rule"], "text": r["text"]}
        for r in _rows(artifact.path / "removed_lines", [doc_id], ["id", "line", "text", "rule"])
    ]
    removed = _rows(artifact.path / "removed", [doc_id], ["id", "rule", "value", "threshold", "detail"])
    if removed:
        r = removed[0]
        return {
            "ref": artifact.ref,
            "outcome": "removed",
            "rule": r["rule"],
            "value": r["value"],
            "threshold": r["threshold"],
            "detail": r.get("detail") or "",
            "removed_lines": lines,
        }
    kept = _rows(artifact.path / "shards", [doc_id], ["id", "text"])
    return {
        "ref": artifact.ref,
        "outcome": "kept" if kept else "absent",
        "chars": len(kept[0]["text"] or "") if kept else 0,
        "removed_lines": lines,
    }


def format_audit(report: dict[str, Any]) -> str:
    """The report as lines for a terminal."""
    if not report["found"]:
        return f"{report['doc_id']}: no download artifact in {report['store']} holds this document"
    out = []
    for doc in report["documents"]:
        where = f"source {doc['source']!r}, file {doc['file']}" + (f", record {doc['record']}" if doc["record"] else "")
        if doc["chunk"] is not None:
            where += f", chunk {doc['chunk']}"
        out.append(f"{doc['id']}")
        out.append(
            f"  download   {_short(doc['download']['ref'])}: found ({where}; {doc['download']['chars']:,} chars)"
        )
        for path in doc["paths"]:
            n = path["normalize"]
            if n is None:
                out.append("  normalize  (not built from this download)")
                continue
            out.append(
                f"  normalize  {_short(n['ref'])}: {'changed' if n['changed'] else 'unchanged'} ({n['chars']:,} chars)"
            )
            f = path["filter"]
            if f is None:
                out.append("  filter     (not built)")
                continue
            if f["outcome"] == "removed":
                detail = f" [{f['detail']}]" if f["detail"] else ""
                out.append(
                    f"  filter     {_short(f['ref'])}: REMOVED by {f['rule']}{detail} "
                    f"(value {f['value']:.4g}, threshold {f['threshold']:.4g})"
                )
            else:
                out.append(f"  filter     {_short(f['ref'])}: {f['outcome']}")
            for line in f["removed_lines"][:20]:
                out.append(f"               line {line['line']} dropped by {line['rule']}: {line['text'][:70]!r}")
            if len(f["removed_lines"]) > 20:
                out.append(f"               ... {len(f['removed_lines']) - 20} more lines dropped")
            d = path["dedup"]
            if f["outcome"] == "kept":
                if d is None:
                    out.append("  dedup      (not built)")
                elif d["outcome"] == "kept":
                    out.append(f"  dedup      {_short(d['ref'])}: kept")
                else:
                    out.append(
                        f"  dedup      {_short(d['ref'])}: DROPPED as a duplicate ({d['kind']}) of {d['kept_id']}"
                        + (f" (Jaccard {d['jaccard']})" if d.get("jaccard") is not None else "")
                    )
        for run in doc["runs"]:
            out.append(
                f"  run        {run['name']} at {run['created']} UTC ({run['file']}"
                + (f", flow run {run['flow_run_id']}" if run["flow_run_id"] else "")
                + f") used its {', '.join(run['stages'])} artifacts"
            )
        if not doc["runs"]:
            out.append("  run        (no recorded pipeline run used these artifacts)")
    return "\n".join(out)


def _short(ref: str) -> str:
    stage, _, key = ref.partition("/")
    return f"{stage}/{key[:12]}"
