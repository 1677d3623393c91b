"""The model card (`README.md`) and provenance files of a release, from the artifacts behind it.

Everything here is read, never guessed: what went in per source comes from the download
artifact's metrics and what survived curation from the dedup artifact's shards; what the
curation removed from the normalize / filter / dedup metrics; model size, training and eval
figures from `config.json` and `report.json`. A licence is the publish config's `licenses`
entry for the source, else the `Licence:` line of a SOURCE.md or README.md beside the source's
files, else "unknown".

`lineage` walks the store's manifests upstream from the publish stage's inputs, so a release
can name the artifact (store key) and the settings of every stage that produced it;
`pipeline_yaml` writes those settings back as a pipeline config that `ember run` accepts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import yaml
from safetensors import safe_open

from ember.storage.shards import list_shards, read_shard
from ember.storage.store import MANIFEST, Store, StoreError, read_json_or_none

LICENCE_LINE = re.compile(r"^\s*[-*]?\s*\**\s*licen[cs]e\s*\**\s*[:：]\s*\**\s*(.+)$", re.IGNORECASE)
LICENCE_FILES = ("SOURCE.md", "README.md")
LICENCE_MAX_CHARS = 300
UNKNOWN = "unknown"


def lineage(store: Store, inputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """stage -> manifest of every artifact the inputs were made from (the inputs included).

    Walks `manifest["inputs"]` refs through the store; a manifest that cannot be read (a test's
    stand-in folder, an artifact deleted since) just ends that branch.
    """
    found: dict[str, dict[str, Any]] = {}  # stage -> its manifest
    pending: list[tuple[str, dict[str, Any] | None]] = [
        (name, read_json_or_none(Path(folder) / MANIFEST)) for name, folder in inputs.items()
    ]
    while pending:
        name, manifest = pending.pop()
        if manifest is None or name in found:
            continue
        found[name] = manifest
        for upstream, ref in manifest.get("inputs", {}).items():
            if upstream in found:
                continue
            try:
                artifact = store.get(ref)
            except StoreError:
                artifact = None
            pending.append((upstream, artifact.manifest if artifact else None))
    return dict(sorted(found.items(), key=lambda kv: _order(kv[0])))


def stage_names() -> list[str]:
    """The pipeline's stages in order (the card lists them so)."""
    # Imported here: the stage list imports every stage, this one included.
    from ember.tasks.stages import STAGE_NAMES

    return STAGE_NAMES


def _order(stage: str) -> int:
    names = stage_names()
    return names.index(stage) if stage in names else len(names)


def store_keys(stages: dict[str, dict[str, Any]]) -> dict[str, str]:
    """stage -> ref, for release.json (gc keeps every ref a release names)."""
    return {stage: manifest["ref"] for stage, manifest in stages.items() if manifest.get("ref")}


def pipeline_config(stages: dict[str, dict[str, Any]], publish_params: dict[str, Any]) -> dict[str, Any]:
    """The stages' settings as a pipeline config. Settings that do not change an artifact (left
    out of its key) are not recorded, so they take their defaults."""
    config: dict[str, Any] = {}
    for stage, manifest in stages.items():
        if stage in stage_names() and "params" in manifest:
            config[stage] = {k: v for k, v in manifest["params"].items() if k != "identity"}
    config["publish"] = publish_params
    return config


def pipeline_yaml(stages: dict[str, dict[str, Any]], publish_params: dict[str, Any]) -> str:
    header = (
        "# The settings of every stage that produced this release, as recorded in the store's\n"
        "# manifests (settings that do not change an artifact are left at their defaults).\n"
        "# `ember run pipeline.yaml` rebuilds it: each stage is a cache hit while its artifact exists.\n"
    )
    return header + yaml.safe_dump(pipeline_config(stages, publish_params), sort_keys=False, allow_unicode=True)


# -- data ------------------------------------------------------------------------------------------


def licence_near(location: str) -> tuple[str, str] | None:
    """(licence text, file it came from) from a SOURCE.md / README.md beside a local source."""
    if not location or "://" in location:
        return None
    path = Path(location).expanduser()
    while any(ch in path.name for ch in "*?["):  # a glob: look in the folder it starts from
        path = path.parent
    folders = [path] if path.is_dir() else [path.parent]
    for folder in folders:
        for name in LICENCE_FILES:
            try:
                lines = (folder / name).read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                match = LICENCE_LINE.match(line)
                if match:
                    text = match.group(1).replace("**", "").strip()
                    if len(text) > LICENCE_MAX_CHARS:
                        text = text[:LICENCE_MAX_CHARS].rsplit(" ", 1)[0] + " …"
                    return text, str(folder / name)
    return None


def source_rows(
    stages: dict[str, dict[str, Any]], dedup_dir: Path | None, licenses: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per source: what was read, what survived filter and dedup, and its licence."""
    from ember.tasks.download import Source  # the download config's own naming rule

    download = stages.get("download", {})
    per_source = download.get("metrics", {}).get("per_source", {})
    locations: dict[str, str] = {}  # source name -> where its files are
    for raw in download.get("params", {}).get("sources", []):
        try:
            source = Source.model_validate(raw)
        except ValueError:
            continue
        locations[source.source_name()] = source.location
    kept = kept_per_source(dedup_dir) if dedup_dir is not None else {}
    rows: list[dict[str, Any]] = []
    for name in dict.fromkeys([*per_source, *locations, *kept]):
        read = per_source.get(name, {})
        if name in licenses:
            licence, where = licenses[name], "publish.licenses"
        else:
            licence, where = licence_near(locations.get(name, "")) or (UNKNOWN, "")
        rows.append(
            {
                "source": name,
                "location": locations.get(name, ""),
                "docs": read.get("docs"),
                "chunks": read.get("chunks"),
                "chars": read.get("chars"),
                "kept_chunks": kept.get(name, {}).get("docs") if kept else None,
                "kept_chars": kept.get(name, {}).get("chars") if kept else None,
                "licence": licence,
                "licence_from": where,
            }
        )
    return rows


def kept_per_source(dedup_dir: Path) -> dict[str, dict[str, int]]:
    """Documents and characters per source in the dedup artifact's shards (the training text)."""
    counts: dict[str, dict[str, int]] = {}  # source -> docs, chars
    for path in list_shards(Path(dedup_dir) / "shards"):
        table = read_shard(path, columns=["source", "text"])
        lengths = pc.utf8_length(table["text"]).to_pylist()
        for source, n in zip(table["source"].to_pylist(), lengths, strict=True):
            # A null source (no stage writes one) counts as "", as the tokenizer report groups it.
            entry = counts.setdefault(source or "", {"docs": 0, "chars": 0})
            entry["docs"] += 1
            entry["chars"] += n or 0
    return counts


# -- the card --------------------------------------------------------------------------------------


def parameter_count(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        total = 0
        for name in f.keys():
            size = 1
            for dim in f.get_slice(name).get_shape():
                size *= dim
            total += size
        return total


def _n(value: object, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def render(
    version: str, created: str, folder: Path, stages: dict[str, dict[str, Any]], sources: list[dict[str, Any]]
) -> str:
    """The card's markdown, from the release folder's files and the lineage's manifests."""
    config = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
    model, train = config.get("model", {}), config.get("train", {})
    train_metrics = stages.get("train", {}).get("metrics", {})
    params = parameter_count(folder / "model.safetensors")
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    lines = [
        f"# Ember model {version}",
        "",
        f"Published {created}. A small decoder-only transformer (Llama layout: RMSNorm, rotary "
        "positions, SwiGLU, grouped-query attention) trained from scratch by Ember on the text below. "
        "It continues text in the style of its training data; it is not instruction-tuned, it makes "
        "things up, and nothing it writes should be taken as fact.",
        "",
        "## Model",
        "",
        f"- parameters: {params:,}",
        f"- width {model.get('dim', 'n/a')}, {model.get('n_layers', 'n/a')} layers, {model.get('n_heads', 'n/a')} "
        f"attention heads ({model.get('n_kv_heads', 'n/a')} key/value)",
        f"- context: {model.get('max_seq_len', 'n/a')} tokens; vocabulary: {model.get('vocab_size', 'n/a')} "
        "(byte-level BPE)",
        f"- weights: fp32 {_mb(files.get('model.safetensors'))}, int8 {_mb(files.get('model-int8.safetensors'))}",
        "",
        "## Training",
        "",
        f"{_n(train.get('steps'))} steps, {_n(train.get('tokens'))} training tokens in "
        f"{_duration(train.get('seconds'))}"
        + (f" on {train_metrics['device']}" if train_metrics.get("device") else "")
        + (f" ({_n(train_metrics['tokens_per_s'])} tokens/s)" if train_metrics.get("tokens_per_s") else "")
        + f". Final train loss {_n(train.get('loss'), 4)}, validation loss {_n(train.get('val_loss'), 4)}.",
        "",
    ]
    lines += _eval_section(report)
    lines += _data_section(stages, sources)
    lines += _samples_section(report)
    lines += [
        "## Use it",
        "",
        "```bash",
        f"ember demo --release {version}          # the Gradio demo, http://127.0.0.1:7860",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("hf")   # this folder\'s hf/',
        'tokenizer = AutoTokenizer.from_pretrained("hf")',
        "```",
        "",
    ]
    ggufs = sorted(name for name in files if name.endswith(".gguf"))
    if ggufs:
        lines += [f"For llama.cpp / Ollama: {', '.join(f'`{g}`' for g in ggufs)}.", ""]
    lines += _provenance_section(stages)
    return "\n".join(lines)


def _eval_section(report: dict[str, Any]) -> list[str]:
    names = report.get("models", [])
    if not names:
        return ["## Evaluation", "", "No evaluation report.", ""]
    val = report.get("val", {})
    lines = [
        "## Evaluation",
        "",
        f"On {_n(val.get('tokens'))} held-out validation tokens ({_n(val.get('windows'))} windows of "
        f"{_n(val.get('seq_len'))}); lower is better. tokens/s is greedy generation on the machine that "
        "ran the pipeline.",
        "",
        "| weights | file size | val loss | perplexity | bits per byte | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        s = report.get(name, {})
        lines.append(
            f"| {name} | {_mb(s.get('file_bytes'))} | {_n(s.get('val_loss'), 4)} | "
            f"{_n(s.get('perplexity'), 2)} | {_n(s.get('bpb'), 4)} | {_n(s.get('tokens_per_s'), 1)} |"
        )
    for e in report.get("external", []):
        for name, s in e.get("models", {}).items():
            lines.append(
                f"| {name} on `{Path(e['path']).name}` | | {_n(s.get('loss'), 4)} | "
                f"{_n(s.get('perplexity'), 2)} | {_n(s.get('bpb'), 4)} | |"
            )
    return lines + ["", "The full report is `report.md` in this folder.", ""]


def _data_section(stages: dict[str, dict[str, Any]], sources: list[dict[str, Any]]) -> list[str]:
    lines = ["## Data", ""]
    if not sources:
        return lines + ["Not recorded (the publish stage was not given the download artifact).", ""]
    # Read and kept share a cell: four columns fit a narrow column (the demo's, a phone's) where
    # seven did not, and each cell reads as what went in and what came out.
    lines += [
        "Documents longer than the download's `chunk_chars` are split into chunks; the filter and "
        "dedup stages work on chunks. Kept = what the tokenizer and the model were trained on.",
        "",
        "| source | documents | chunks: read → kept | characters: read → kept |",
        "|---|---:|---:|---:|",
    ]
    for row in sources:
        share = (
            f" ({100 * row['kept_chars'] / row['chars']:.1f}%)"
            if row.get("kept_chars") is not None and row.get("chars")
            else ""
        )
        lines.append(
            f"| {row['source']} | {_n(row['docs'])} | {_n(row['chunks'])} → {_n(row['kept_chunks'])} | "
            f"{_n(row['chars'])} → {_n(row['kept_chars'])}{share} |"
        )
    lines += ["", "Licences (of the sources, as their own documentation states them):", ""]
    for row in sources:
        where = f" (from `{row['licence_from']}`)" if row["licence_from"] else ""
        lines.append(f"- **{row['source']}**: {row['licence']}{where}")
    lines += ["", "### What curation removed", ""]
    normalize = stages.get("normalize", {}).get("metrics")
    if normalize:
        lines.append(
            f"- normalize: {_n(normalize.get('ftfy_changed'))} chunks repaired by ftfy, "
            f"{_n(normalize.get('other_changed'))} changed by Unicode / whitespace / control-character "
            "normalization (none removed)."
        )
    filtered = stages.get("filter", {}).get("metrics")
    if filtered:
        rules = ", ".join(
            f"{rule} {_n(n)}" for rule, n in sorted(filtered.get("removed_per_rule", {}).items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"- filter: removed {_n(filtered.get('removed'))} of {_n(filtered.get('docs'))} chunks "
            f"({100 * (filtered.get('removed_fraction') or 0):.1f}%, "
            f"{_n(filtered.get('removed_chars'))} characters)" + (f"; by rule: {rules}." if rules else ".")
        )
    dedup = stages.get("dedup", {}).get("metrics")
    if dedup:
        lines.append(
            f"- dedup: removed {_n(dedup.get('exact_dups'))} exact and {_n(dedup.get('near_dups'))} "
            f"near duplicates of {_n(dedup.get('docs'))} chunks; {_n(dedup.get('kept'))} kept."
        )
    if not (normalize or filtered or dedup):
        lines.append("Not recorded (the publish stage was not given the curation artifacts).")
    return lines + [""]


def _samples_section(report: dict[str, Any]) -> list[str]:
    samples = report.get("samples", {}).get("fp32", [])
    if not samples:
        return []
    g = report.get("generation", {})
    lines = [
        "## Sample outputs",
        "",
        f"fp32 weights, temperature {g.get('temperature')}, top-k {g.get('top_k')}, "
        f"up to {g.get('max_new_tokens')} new tokens; the prompt is in bold.",
        "",
    ]
    for s in samples:
        completion = s["completion"].replace("\n", "\n> ")
        lines += [f"> **{s['prompt']}**{completion}", ""]
    return lines


def _provenance_section(stages: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "## Provenance",
        "",
        "The store artifacts (`ember show REF`) that produced this release; `pipeline.yaml` holds "
        "their settings and `release.json` every file's sha256.",
        "",
        "| stage | store key |",
        "|---|---|",
    ]
    for stage, manifest in stages.items():
        if manifest.get("ref"):
            lines.append(f"| {stage} | `{manifest['ref']}` |")
    return lines + [""]
