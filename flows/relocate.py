"""Units of work on machines that share nothing with the flow's but the object store.

A stage hands `ctx.map` units whose arguments are paths of the flow's machine: input artifacts in
its cache (`<cache>/artifacts/<stage>/<key>/...`), the artifact being written (`<cache>/tmp/...`)
and the stage's scratch (`<cache>/work/<stage>/<key>/...`). A Dask worker elsewhere has none of
them. `Relocated` wraps a unit so that on the worker:

- an input artifact is fetched by its ref into the worker's own cache (`ObjectStore.require`);
- a `tmp/` or `work/` folder is first filled from a staging prefix in the bucket
  (`staging/<id>/<folder>/...`: what the flow and earlier units put there), and what the unit
  writes into it is uploaded there after;
- every path is rewritten to the worker's cache, and the paths in the unit's result back.

`sync_up` (before a map) and `sync_down` (after it) are the flow's half: its folders to the
staging prefix and back. Files are compared by size and modification time, so a file already
there is not sent again. The stage's code is unchanged, and so are its bytes: `tests/test_object_store.py`
compares them with a sequential run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ember.storage.objects import ObjectStore

# A folder's files as sent or found: relative path -> (size, mtime_ns).
Stamps = dict[str, tuple[int, int]]


def _folder(rel: str) -> str | None:
    """The staged folder a path under the cache belongs to: `tmp/<name>` or `work/<stage>/<key>`."""
    parts = rel.split("/")
    if parts[0] == "tmp" and len(parts) >= 2:
        return "/".join(parts[:2])
    if parts[0] == "work" and len(parts) >= 3:
        return "/".join(parts[:3])
    return None


def _rewrite(value: Any, old: str, new: str, seen: Callable[[str], None] | None = None) -> Any:
    """`value` with every path under `old` moved under `new` (in strings, Paths, dicts, lists,
    tuples); `seen` hears each relative path found."""
    if isinstance(value, (str, Path)):
        text = str(value)
        if text == old or text.startswith(old + "/"):
            rel = text[len(old) + 1 :]
            if seen is not None:
                seen(rel)
            moved = new + ("/" + rel if rel else "")
            return Path(moved) if isinstance(value, Path) else moved
        return value
    if isinstance(value, dict):
        return {k: _rewrite(v, old, new, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rewrite(v, old, new, seen) for v in value)
    return value


def folders_in(fn: Callable[..., object], items: Sequence[object], root: str) -> set[str]:
    """The staged folders that a map's arguments name."""
    found: set[str] = set()

    def seen(rel: str) -> None:
        if (folder := _folder(rel)) is not None:
            found.add(folder)

    args = (fn.args, fn.keywords) if isinstance(fn, functools.partial) else ()
    _rewrite([args, items], root, root, seen)
    return found


def _files(base: Path) -> Stamps:
    return (
        {
            p.relative_to(base).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in base.rglob("*")
            if p.is_file()
        }
        if base.is_dir()
        else {}
    )


def _push(store: ObjectStore, root: Path, folder: str, staging: str, since: Stamps) -> None:
    for rel, stamp in _files(root / folder).items():
        if since.get(rel) != stamp:
            store.fs.put_file(str(root / folder / rel), f"{staging}/{folder}/{rel}")


def _pull(store: ObjectStore, root: Path, folder: str, staging: str) -> None:
    remote = f"{staging}/{folder}"
    if not store.fs.exists(remote):
        return
    for path, info in store.fs.find(remote, detail=True).items():
        rel = path[len(remote) + 1 :]
        target = root / folder / rel
        if not target.is_file() or target.stat().st_size != info["size"]:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            store.fs.get_file(path, str(tmp))
            os.replace(tmp, target)


def sync_up(store: ObjectStore, folders: set[str], staging: str, sent: dict[str, Stamps]) -> None:
    """The flow's folders to the staging prefix (what changed since `sent` says it was sent)."""
    for folder in folders:
        _push(store, store.root, folder, staging, sent.get(folder, {}))
        sent[folder] = _files(store.root / folder)


def sync_down(store: ObjectStore, folders: set[str], staging: str, sent: dict[str, Stamps]) -> None:
    """What the units wrote, from the staging prefix into the flow's folders."""
    for folder in folders:
        _pull(store, store.root, folder, staging)
        sent[folder] = _files(store.root / folder)


class Relocated:
    """`fn` run on a machine whose cache is not the flow's (see the module's docstring)."""

    def __init__(self, fn: Callable[[Any], Any], url: str, origin: str, staging: str):
        self.fn, self.url, self.origin, self.staging = fn, url, origin, staging

    def __call__(self, item: Any) -> Any:
        store = ObjectStore(self.url)  # this machine's cache: $EMBER_CACHE, or its default
        here = str(store.root)
        refs: set[str] = set()
        folders: set[str] = set()

        def seen(rel: str) -> None:
            parts = rel.split("/")
            if parts[0] == "artifacts" and len(parts) >= 3:
                refs.add(f"{parts[1]}/{parts[2]}")
            elif (folder := _folder(rel)) is not None:
                folders.add(folder)

        fn = self.fn
        if isinstance(fn, functools.partial):
            fn = functools.partial(
                fn.func, *_rewrite(fn.args, self.origin, here, seen), **_rewrite(fn.keywords, self.origin, here, seen)
            )
        item = _rewrite(item, self.origin, here, seen)
        for ref in refs:
            store.require(ref)
        for folder in folders:
            (store.root / folder).mkdir(parents=True, exist_ok=True)  # as the flow made it
            _pull(store, store.root, folder, self.staging)
        before = {folder: _files(store.root / folder) for folder in folders}
        result = fn(item)
        for folder in folders:
            _push(store, store.root, folder, self.staging, before[folder])
        return _rewrite(result, here, self.origin)
