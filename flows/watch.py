"""The corpus watcher: a short flow that says, as a Prefect event, when a config's sources changed.

`watch-corpus` runs on an interval (the config's `schedule.watch_seconds`). It takes the sources'
identity from `download.preflight` (what the download stage's key is built from), compares it with
the one it saw last (`<store>/watch/<config name>.json`) and, when it differs, emits
`ember.corpus.changed` about the resource `ember.config.<name>`. The `retrain` deployment has a
trigger on that event; an unchanged corpus emits nothing, so nothing runs.

The first check of a store only records what it sees: a corpus that changed while nobody watched
is picked up by the scheduled retrain, not by a burst of events on start-up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event

from ember.flows.config import PipelineConfig
from ember.storage.store import canonical_json, write_json_atomic
from ember.tasks import download

EVENT = "ember.corpus.changed"


def resource_id(config_name: str) -> str:
    """The Prefect resource an `ember.corpus.changed` event is about (what triggers match on)."""
    return f"ember.config.{config_name}"


def seen_path(store_root: Path, config_name: str) -> Path:
    return Path(store_root) / "watch" / f"{config_name}.json"


def _run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    return f"watch-{config['name'] if isinstance(config, dict) else config.name}"


@flow(name="watch-corpus", flow_run_name=_run_name, persist_result=False)
def watch_corpus(config: PipelineConfig, store_root: str | None = None) -> dict:
    """Emit `ember.corpus.changed` if the sources differ from the last check. Returns what it saw."""
    logger = get_run_logger()
    identity = download.preflight(config.download)
    digest = hashlib.sha256(canonical_json(identity).encode()).hexdigest()
    path = seen_path(config.store_root(store_root), config.name)
    previous = json.loads(path.read_text()) if path.is_file() else None
    changed = previous is not None and previous.get("digest") != digest
    if previous is None:
        logger.info("first look at %s's sources (%s): recorded in %s", config.name, digest[:12], path)
    elif changed:
        # Emitted before the new identity is recorded: if this run dies in between, the next
        # check sees the change again rather than never.
        emit_event(event=EVENT,
                   resource={"prefect.resource.id": resource_id(config.name), "prefect.resource.name": config.name},
                   payload={"digest": digest, "previous_digest": previous.get("digest"),
                            "sources": [entry.get("name") for entry in identity]})
        logger.info("%s's sources changed (%s -> %s): emitted %s", config.name, previous["digest"][:12],
                    digest[:12], EVENT)
    else:
        logger.info("%s's sources unchanged (%s)", config.name, digest[:12])
    if previous is None or changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"digest": digest, "identity": identity})
    return {"digest": digest, "changed": changed}
