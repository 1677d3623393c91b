"""The corpus watcher: says, as a Prefect event, when a config's sources changed.

`check_sources` takes the sources' identity from `download.preflight` (what the download stage's
key is built from), compares it with the one it saw last (`<store>/watch/<config name>.json`) and,
when it differs, emits `ember.corpus.changed` about the resource `ember.config.<name>`. The
`retrain` deployment has a trigger on that event; an unchanged corpus emits nothing.

`watch_sources` checks every `schedule.watch_seconds` in a thread of the serve process. It is not
a scheduled flow: that put a flow run in the UI every ten minutes, nearly all of them saying
"nothing changed". Now the UI shows the runs that did something: the retrains an event triggers.

The first check of a store only records what it sees: a corpus that changed while nobody watched
is picked up by the scheduled retrain, not by a burst of events on start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import TypedDict

from prefect.events import emit_event

from ember.flows.config import PipelineConfig
from ember.storage.store import canonical_json, write_json_atomic
from ember.tasks import download

EVENT = "ember.corpus.changed"
log = logging.getLogger("ember.watch")


class SourcesCheck(TypedDict):
    digest: str  # sha256 of the sources' identity
    changed: bool  # differs from the last check (never on a store's first check)


def resource_id(config_name: str) -> str:
    """The Prefect resource an `ember.corpus.changed` event is about (what triggers match on)."""
    return f"ember.config.{config_name}"


def seen_path(store_root: Path, config_name: str) -> Path:
    return Path(store_root) / "watch" / f"{config_name}.json"


def check_sources(config: PipelineConfig, store_root: str | Path | None = None) -> SourcesCheck:
    """Emit `ember.corpus.changed` if the sources differ from the last check. Returns what it saw."""
    identity = download.preflight(config.download)
    digest = hashlib.sha256(canonical_json(identity).encode()).hexdigest()
    path = seen_path(config.open_store(store_root).root, config.name)  # a cache folder, for an object store
    previous = json.loads(path.read_text()) if path.is_file() else None
    changed = previous is not None and previous.get("digest") != digest
    if previous is None:
        log.info("first look at %s's sources (%s): recorded in %s", config.name, digest[:12], path)
    elif changed:
        # Emitted before the new identity is recorded: if this process dies in between, the next
        # check sees the change again rather than never.
        emit_event(
            event=EVENT,
            resource={"prefect.resource.id": resource_id(config.name), "prefect.resource.name": config.name},
            payload={
                "digest": digest,
                "previous_digest": previous.get("digest"),
                "sources": [entry.get("name") for entry in identity],
            },
        )
        log.info(
            "%s's sources changed (%s -> %s): emitted %s", config.name, previous["digest"][:12], digest[:12], EVENT
        )
    else:
        log.info("%s's sources unchanged (%s)", config.name, digest[:12])
    if previous is None or changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"digest": digest, "identity": identity})
    return {"digest": digest, "changed": changed}


def watch_sources(
    config: PipelineConfig, every_s: float, stop: threading.Event, store_root: str | Path | None = None
) -> None:
    """`check_sources` every `every_s` seconds until `stop` is set. A failed check (a source folder
    gone for a moment, a server not reachable) is logged and tried again at the next one."""
    log.info("watching %s's sources every %g s", config.name, every_s)
    while not stop.is_set():
        try:
            check_sources(config, store_root)
        except Exception as err:  # noqa: BLE001  (the watcher outlives one bad look)
            log.warning("checking %s's sources failed: %s: %s", config.name, type(err).__name__, err)
        stop.wait(every_s)
