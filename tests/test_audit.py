"""`ember audit DOC_ID` on a tiny store built by the real data stages (download to dedup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember.flows.audit import audit_document, format_audit
from ember.storage.store import Store
from ember.tasks import dedup, download, normalize
from ember.tasks import filter as quality_filter
from ember.tasks.dedup import DedupConfig
from ember.tasks.download import DownloadConfig
from ember.tasks.filter import FilterConfig, judge
from ember.tasks.normalize import NormalizeConfig, normalize_text
from ember.tasks.stage import run_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpora) -> tuple[Store, dict]:
    root = tmp_path_factory.mktemp("audit")
    folder = root / "corpus"
    folder.mkdir()
    with open(corpora / "gutenberg_en" / "books-00.jsonl", encoding="utf-8") as f:
        book = json.loads(f.readline())["text"]
    prose = book[20_000:23_500]
    prose = normalize_text(prose[prose.index("\n\n") + 2 : prose.rindex("\n\n")], NormalizeConfig())
    prose = judge(prose, FilterConfig()).text  # without its chapter heading: nothing left to drop
    page = "Home\nNews\nSign In\n\n" + prose + "\n\nCopyright © 2019 The Paper. All Rights Reserved.\n"
    records = [
        {"text": prose},  # :0 kept
        {"text": "Buy now! " * 30},  # :1 removed by the filter
        {"text": "caf\u00c3\u00a9 " + prose},  # :2 normalized (mojibake), then a near/exact duplicate
        {"text": page},  # :3 kept, with its menu and footer lines dropped
    ]
    with open(folder / "mini.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    s = Store(root / "store")
    cfg = DownloadConfig(sources=[{"name": "mini", "path": str(folder)}])
    refs = {}
    refs["download"] = run_stage(s, download.STAGE, cfg, {}, identity=download.preflight(cfg)).ref
    refs["normalize"] = run_stage(s, normalize.STAGE, NormalizeConfig(), {"download": refs["download"]}).ref
    refs["filter"] = run_stage(s, quality_filter.STAGE, FilterConfig(), {"normalize": refs["normalize"]}).ref
    refs["dedup"] = run_stage(s, dedup.STAGE, DedupConfig(), {"filter": refs["filter"]}).ref
    s.record_run("tiny-audit", refs, {"flow_run_id": "abc-123"})
    return s, refs


def one(report: dict) -> tuple[dict, dict]:
    assert report["found"] and len(report["documents"]) == 1
    doc = report["documents"][0]
    assert len(doc["paths"]) == 1
    return doc, doc["paths"][0]


def test_kept_document(store):
    s, refs = store
    doc, path = one(audit_document(s, "mini/mini.jsonl:0"))
    assert (doc["source"], doc["file"], doc["record"]) == ("mini", "mini.jsonl", "0")
    assert doc["download"]["ref"] == refs["download"]
    assert path["normalize"] == {"ref": refs["normalize"], "changed": False, "chars": doc["download"]["chars"]}
    assert path["filter"]["outcome"] == "kept" and path["filter"]["removed_lines"] == []
    assert path["dedup"] == {"ref": refs["dedup"], "outcome": "kept"}
    assert [(r["name"], r["flow_run_id"], r["stages"]) for r in doc["runs"]] == [
        ("tiny-audit", "abc-123", ["dedup", "download", "filter", "normalize"])
    ]


def test_removed_document_names_rule_value_threshold(store):
    s, refs = store
    doc, path = one(audit_document(s, "mini/mini.jsonl:1"))
    f = path["filter"]
    assert f["ref"] == refs["filter"] and f["outcome"] == "removed"
    assert f["rule"] and f["value"] is not None and f["threshold"] is not None
    assert path["dedup"] is None
    text = format_audit(audit_document(s, "mini/mini.jsonl:1"))
    assert f"REMOVED by {f['rule']}" in text and "threshold" in text


def test_duplicate_and_normalized_document(store):
    s, refs = store
    doc, path = one(audit_document(s, "mini/mini.jsonl:2"))
    assert path["normalize"]["changed"] is True
    assert path["filter"]["outcome"] == "kept"
    assert path["dedup"]["outcome"] == "duplicate" and path["dedup"]["kept_id"] == "mini/mini.jsonl:0"
    assert path["dedup"]["kind"] in ("exact", "near", "minhash")
    assert ") of mini/mini.jsonl:0" in format_audit(audit_document(s, "mini/mini.jsonl:2"))


def test_dropped_lines_are_listed(store):
    s, _ = store
    doc, path = one(audit_document(s, "mini/mini.jsonl:3"))
    lines = {(r["line"], r["text"]) for r in path["filter"]["removed_lines"]}
    assert {(0, "Home"), (1, "News"), (2, "Sign In")} <= lines
    assert any("All Rights Reserved" in text for _, text in lines)
    assert path["filter"]["outcome"] == "kept"


def test_unknown_document(store):
    s, _ = store
    report = audit_document(s, "mini/mini.jsonl:99")
    assert not report["found"] and "no download artifact" in format_audit(report)


@pytest.mark.slow
def test_cli(store):
    s, refs = store
    cli = [sys.executable, "-m", "ember.flows.cli", "audit"]
    run = subprocess.run(
        [*cli, "mini/mini.jsonl:1", "--store", str(s.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "REMOVED by" in run.stdout and "tiny-audit" in run.stdout
    missing = subprocess.run(
        [*cli, "nope:0", "--store", str(s.root)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert missing.returncode == 1 and "no download artifact" in missing.stdout
