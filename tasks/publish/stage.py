"""publish: copy a trained model, its tokenizer and its report into `releases/<version>/`.

Releases live outside the artifact store (`<store_root>/releases/`, the registry of
storage/releases.py), so gc and reruns never touch what the demo serves. A release is built in
`releases/.tmp-*` and renamed into place, `release.json` included, so a crash never leaves half a
release under a version name; then `latest` is switched atomically. With the store on object
storage the releases are mirrored there (storage/objects.py): fetched before, sent after. Publishing the same inputs
again makes no new version: `latest` is pointed at the release that already holds them.

The gate: when a release is already published, the candidate is published only if its bits
per byte are lower than the published model's, both scored on the candidate's validation text
(each model with its own tokenizer, so a changed tokenizer still compares fairly); `force`
overrides. The first release always publishes.

A release is immutable: its files are made read-only once it is in place, and publishing
never writes into an existing version (a changed model, card or layout is a new version). Besides
the copied files it holds a model card (`README.md`, see model_card.py), `pipeline.yaml` (the
settings of every stage behind it) and `release.json` (version, date, the store key of every
artifact behind it under `lineage`, each file's size and sha256); `ember gc` keeps every
artifact a release names.

The stage's artifact is a copy of `release.json`, which records which version it made, or a
`decision.json` saying why nothing was published.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from ember.model.checkpoint import load_model
from ember.model.export import export_gguf, export_hf
from ember.model.scoring import text_bits_per_byte
from ember.model.tokenizer import EOS_ID, TOKENIZER_FILES, load_tokenizer
from ember.storage.releases import CARD, LATEST, RELEASE_JSON, find_release, next_version, point_latest, publish_lock
from ember.storage.store import MANIFEST, Store, file_sha256, read_json_or_none
from ember.storage.tokens import TokenStream
from ember.tasks.publish import model_card
from ember.tasks.stage import Stage, StageContext

PIPELINE_YAML = "pipeline.yaml"
# In a release's layout: a new card format makes a new version, never a rewrite.
# 2: the data table in four columns (read → kept in one cell), to fit the demo's column.
CARD_FORMAT = 2

# stage -> files a release takes from its artifact (all required).
REQUIRED = {
    "train": ("model.safetensors", "config.json"),
    "quantize": ("model-int8.safetensors",),
    "evaluate": ("report.json", "report.md"),
    "train_tokenizer": TOKENIZER_FILES,
}
OPTIONAL = {"train": ("loss.jsonl",), "quantize": ("model-int8-wo.safetensors",)}
REPORT_IMAGES = (".png", ".svg")  # the evaluate report's plots, which report.md links by name


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_int8: bool = Field(True, description="Ship the int8 model (model-int8.safetensors) beside the fp32 one.")
    gate: bool = Field(
        True,
        description="Publish only a candidate with lower bits per byte than the release "
        "`latest` points to, both scored on the candidate's validation text.",
    )
    force: bool = Field(False, description="Publish even when the gate says no (`ember run --force-publish`).")
    gate_tokens: int = Field(
        100_000, ge=1000, description="Validation tokens (of the candidate's tokenizer) the gate scores both models on."
    )
    export_hf: bool = Field(True, description="Also write hf/: a LlamaForCausalLM folder transformers loads.")
    gguf: list[Literal["f32", "f16", "q8_0"]] = Field(
        ["f16", "q8_0"], description="GGUF files to write for llama.cpp / Ollama (model-<type>.gguf); [] for none."
    )
    licenses: dict[str, str] = Field(
        {},
        description="source name -> licence, for the model card; a source not "
        "named here gets the `Licence:` line of a SOURCE.md / README.md beside its "
        'files, else "unknown".',
    )


# -- the gate --------------------------------------------------------------------------------------


def validation_texts(tokens_dir: Path, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """The first whole validation documents of a tokenize artifact, up to `max_tokens`, as text.

    The tokenizer is lossless, so this is the text the candidate was validated on; scoring any
    model on text (with its own tokenizer) makes models with different tokenizers comparable.
    """
    texts: list[str] = []
    taken = 0
    for part in TokenStream(tokens_dir / "val").parts:
        for doc in np.split(part, np.flatnonzero(part == EOS_ID) + 1):
            if taken >= max_tokens:
                return texts
            ids = doc[:-1] if len(doc) and doc[-1] == EOS_ID else doc
            if len(ids):
                texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=False))
                taken += len(doc)
    return texts


class GateDecision(TypedDict):
    """The gate's scores (bits per byte on the candidate's validation text) and verdict."""

    published_version: str
    candidate_bpb: float
    published_bpb: float
    better: bool
    docs: int


def gate_decision(ctx: StageContext, releases: Path, cfg: PublishConfig) -> GateDecision | None:
    """None when there is nothing to compare with (first release); else the scores and verdict."""
    latest = releases / LATEST
    if not (latest / "model.safetensors").is_file():
        return None
    published_files = (read_json_or_none(latest / RELEASE_JSON) or {}).get("files", {})
    if published_files.get("model.safetensors", {}).get("sha256") == file_sha256(
        Path(ctx.inputs["train"]) / "model.safetensors"
    ):
        return None  # the same weights (republished with a new card or layout): nothing to compare
    if "tokenize" not in ctx.inputs:
        raise ValueError("publish.gate needs the tokenize artifact (the validation text) among its inputs")
    candidate_tokenizer = load_tokenizer(ctx.inputs["train_tokenizer"])
    texts = validation_texts(Path(ctx.inputs["tokenize"]), candidate_tokenizer, cfg.gate_tokens)
    candidate = text_bits_per_byte(load_model(ctx.inputs["train"]), candidate_tokenizer, texts)
    published = text_bits_per_byte(load_model(latest), load_tokenizer(latest), texts)
    return GateDecision(
        published_version=latest.resolve().name,
        candidate_bpb=candidate,
        published_bpb=published,
        better=candidate < published,
        docs=len(texts),
    )


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
        if stage == "quantize" and not include_int8:
            continue
        sources.update({name: inputs[stage] / name for name in names if (inputs[stage] / name).is_file()})
    for path in sorted(inputs["evaluate"].iterdir()):
        if path.suffix in REPORT_IMAGES and path.is_file():
            sources[path.name] = path
    return sources


def artifact_ref(folder: Path) -> str:
    path = folder / MANIFEST
    try:
        ref: str = json.loads(path.read_text())["ref"]
        return ref
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: no readable artifact ref ({err!r}); is {folder} a store artifact?") from None


def _make_read_only(folder: Path) -> None:
    """Files r--r--r--: a release is never edited in place (a new version is published instead)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o444)


def _build_release(
    releases: Path,
    version: str,
    sources: dict[str, Path],
    record: dict[str, Any],
    cfg: PublishConfig,
    inputs: dict[str, Path],
    stages: dict[str, dict[str, Any]],
    source_rows: list[dict[str, Any]],
) -> Path:
    tmp = releases / f".tmp-{version}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, source in sources.items():
            shutil.copy2(source, tmp / name)
        _set_model_max_length(tmp)
        if cfg.export_hf:
            export_hf(inputs["train"], inputs["train_tokenizer"], tmp / "hf")
        for outtype in cfg.gguf:
            export_gguf(inputs["train"], inputs["train_tokenizer"], tmp / f"model-{outtype}.gguf", outtype=outtype)
        (tmp / PIPELINE_YAML).write_text(
            model_card.pipeline_yaml(stages, cfg.model_dump(mode="json")), encoding="utf-8"
        )
        (tmp / CARD).write_text(
            model_card.render(version, record["created"], tmp, stages, source_rows), encoding="utf-8"
        )
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        record["files"] = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files
        }
        (tmp / RELEASE_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        final = releases / version
        os.rename(tmp, final)  # fails rather than merge if the version exists
        _make_read_only(final)
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


def run(cfg: PublishConfig, ctx: StageContext) -> dict[str, Any]:
    started = time.monotonic()
    store = ctx.store or Store(ctx.store_root)
    releases = store.releases_dir
    needed = [stage for stage in REQUIRED if stage != "quantize" or cfg.include_int8]
    missing = [stage for stage in needed if stage not in ctx.inputs]
    if missing:
        raise ValueError(f"publish needs the artifacts of {', '.join(missing)} (inputs given: {sorted(ctx.inputs)})")
    releases.mkdir(parents=True, exist_ok=True)
    sources = release_sources(ctx.inputs, cfg.include_int8)
    refs = {stage: artifact_ref(ctx.inputs[stage]) for stage in REQUIRED if stage in ctx.inputs}
    # What the card says about the data: read before the lock, it may take a few seconds.
    stages = model_card.lineage(store, ctx.inputs)
    source_rows = model_card.source_rows(stages, _dedup_dir(ctx, store, stages), cfg.licenses)

    # One publisher at a time on every machine (an object store's lock), and on this one (the
    # folder's); an object store's releases are fetched first and what was published sent after.
    with store.releases_lock(), publish_lock(store.sync_releases()):
        gate = None
        layout = {
            "files": sorted(sources),
            "hf": cfg.export_hf,
            "gguf": sorted(cfg.gguf),
            "card": CARD_FORMAT,
            "licenses": {row["source"]: row["licence"] for row in source_rows},
        }
        if cfg.gate and find_release(releases, refs, layout) is None:
            gate = gate_decision(ctx, releases, cfg)
        if gate is not None and not gate["better"] and not cfg.force:
            message = (
                f"not published: candidate {gate['candidate_bpb']:.4f} bits per byte vs published "
                f"{gate['published_version']} {gate['published_bpb']:.4f} (lower is better); "
                "`ember run CONFIG --force-publish` publishes it anyway"
            )
            ctx.log.warning(message)
            ctx.report.markdown("publish-gate", f"**{message}**", "Publish gate")
            decision = {"published": False, "reason": message, "gate": gate}
            (ctx.out / "decision.json").write_text(json.dumps(decision, indent=2) + "\n")
            return {
                "published": False,
                "version": gate["published_version"],
                "reason": message,
                "candidate_bpb": gate["candidate_bpb"],
                "published_bpb": gate["published_bpb"],
                "path": "",
                "seconds": round(time.monotonic() - started, 3),
            }
        if gate is not None:
            verdict = "better than" if gate["better"] else "forced over"
            ctx.report.markdown(
                "publish-gate",
                f"Candidate {gate['candidate_bpb']:.4f} bits per byte, {verdict} "
                f"{gate['published_version']} at {gate['published_bpb']:.4f}.",
                "Publish gate",
            )
        for leftover in releases.glob(".tmp-*"):  # a crashed publisher's; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        version = find_release(releases, refs, layout)
        created = version is None
        if version is None:
            version = next_version(releases)
            record = {
                "version": version,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "refs": refs,
                "lineage": model_card.store_keys(stages),
                "layout": layout,
                "metrics": {stage: _manifest_metrics(ctx.inputs[stage]) for stage in refs},
            }
            _build_release(releases, version, sources, record, cfg, ctx.inputs, stages, source_rows)
        point_latest(releases, version)
        store.push_releases()

    record = json.loads((releases / version / RELEASE_JSON).read_text())
    shutil.copyfile(releases / version / RELEASE_JSON, ctx.out / RELEASE_JSON)  # not its read-only mode
    size = sum(f["size"] for f in record["files"].values())
    ctx.report.table(
        "release",
        [{"file": name, "bytes": f["size"]} for name, f in record["files"].items()],
        f"Release {version} ({'new' if created else 'already published; latest points to it'})",
    )
    ctx.log.info("release %s at %s (%s)", version, releases / version, "new" if created else "existing")
    metrics = {
        "published": True,
        "version": version,
        "path": str(releases / version),
        "size_bytes": size,
        "new": created,
        "seconds": round(time.monotonic() - started, 3),
    }
    if gate is not None:
        metrics.update(
            candidate_bpb=gate["candidate_bpb"], published_bpb=gate["published_bpb"], replaced=gate["published_version"]
        )
    return metrics


def _dedup_dir(ctx: StageContext, store: Store, stages: dict[str, dict[str, Any]]) -> Path | None:
    """The dedup artifact (the training text, for the card's per-source counts), if reachable."""
    if "dedup" in ctx.inputs:
        return Path(ctx.inputs["dedup"])
    ref = stages.get("dedup", {}).get("ref")
    if ref and store.get(ref) is not None:
        return store.require(ref).path  # fetched, when the store is an object store
    return None


def _manifest_metrics(folder: Path) -> dict[str, Any]:
    metrics: dict[str, Any] = (read_json_or_none(folder / MANIFEST) or {}).get("metrics", {})
    return metrics


# 3: a model card, pipeline.yaml and the lineage's store keys in every release; files read-only.
# The data stages too: the model card says what went in and what curation removed.
STAGE = Stage(
    name="publish",
    version=3,
    run=run,
    inputs=("download", "normalize", "filter", "dedup", "train_tokenizer", "tokenize", "train", "quantize", "evaluate"),
)
