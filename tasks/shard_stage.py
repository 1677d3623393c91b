"""The base of the per-document, shard-parallel stages (normalize, filter), in datatrove's shape.

A stage subclasses `ShardStage` and says what it writes (`outputs`: a folder and a schema per
kind of output, e.g. kept documents, removed ones, removed lines) and what it does with one
document (`process`); `summarize` turns the counts into reports and metrics. It reads the text
shards of its Stage's one input. The base owns what every such stage needs and used to write again:
- one unit of work per input shard, through `ctx.map` (in order, a process pool or Dask), each
  writing files named after its input shard, so the artifact is the same whatever the order or
  the number of workers;
- reading a shard in batches of about `batch_chars` characters, so a worker holds a few MB of
  text rather than a whole shard;
- the output files, written a batch at a time and renamed into place when the unit ends;
- counting (`Stats`, datatrove's `stat_update`) and timing; the units' counts add up in shard
  order, so "the first example" of something is the same on every run.

Dedup decides globally, not document by document; it uses the same reader and writer
(storage/shards.py) and its own steps.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import pyarrow as pa
from pydantic import BaseModel

from ember.storage.shards import TEXT_SCHEMA, ShardFileWriter, input_shards, iter_batches
from ember.tasks.stage import Metrics, StageContext

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class Document(NamedTuple):
    id: str
    text: str  # never None: a missing text is ""
    source: str


class Stats:
    """What a unit counted. `add(name, n)` sums a figure, `add(name, n, key=...)` a figure per key
    (per rule, per language), `first(name, key, value)` keeps the first value seen for a key
    (an example). Units' stats merge in shard order."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.by_key: dict[str, dict[str, float]] = {}
        self.firsts: dict[str, dict[str, Any]] = {}

    def add(self, name: str, n: float = 1, key: str | None = None) -> None:
        if key is None:
            self.totals[name] = self.totals.get(name, 0) + n
        else:
            counts = self.by_key.setdefault(name, {})
            counts[key] = counts.get(key, 0) + n

    def first(self, name: str, key: str, value: Any) -> None:
        self.firsts.setdefault(name, {}).setdefault(key, value)

    def total(self, name: str) -> float:
        return self.totals.get(name, 0)

    def keyed(self, name: str) -> dict[str, float]:
        return self.by_key.get(name, {})

    def merge(self, later: Stats) -> Stats:
        for name, n in later.totals.items():
            self.add(name, n)
        for name, counts in later.by_key.items():
            for key, n in counts.items():
                self.add(name, n, key)
        for name, values in later.firsts.items():
            for key, value in values.items():
                self.first(name, key, value)
        return self


class ShardStage(Generic[ConfigT]):
    """Subclass it, set `name` (and `outputs` if more than kept shards), write `process` and
    `summarize`; the stage's `run` is `lambda cfg, ctx: MyStage(cfg).run(ctx)`. It reads the text
    shards of its one input (its Stage's `inputs`). `ConfigT` is the stage's config class."""

    name: ClassVar[str]
    outputs: ClassVar[dict[str, pa.Schema]] = {"shards": TEXT_SCHEMA}  # the first is the kept documents
    batch_chars: ClassVar[int] = 2_000_000

    def __init__(self, cfg: ConfigT):
        self.cfg = cfg

    def setup(self) -> None:
        """Once per unit, in the process that runs it (what is costly to build, or not picklable)."""

    def process(self, doc: Document, out: dict[str, ShardFileWriter], stats: Stats) -> None:
        raise NotImplementedError

    def summarize(self, stats: Stats, ctx: StageContext) -> Metrics:
        """Reports for a person (ctx.report) and the stage's metrics, from all units' counts."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> Metrics:
        started = time.monotonic()
        if len(ctx.inputs) != 1:
            raise ValueError(f"{self.name} reads the shards of one upstream artifact, got {sorted(ctx.inputs)}")
        [(upstream, folder)] = ctx.inputs.items()
        shards, total = input_shards(folder, upstream)
        src = Path(folder) / "shards"
        units = ctx.map(partial(run_unit, self, str(src), str(ctx.out)), [p.name for p in shards], f"{self.name}-shard")
        kept = next(iter(self.outputs))
        (ctx.out / kept).mkdir(parents=True, exist_ok=True)  # an empty result is an empty folder
        ctx.report.progress(total, total, self.name)
        stats = Stats()
        for unit in units:
            stats.merge(unit)
        metrics = self.summarize(stats, ctx)
        seconds = time.monotonic() - started
        chars_in = stats.total("chars_in")
        return {
            **metrics,
            "shards": len(units),
            "seconds": round(seconds, 2),
            "mb_per_s": round(chars_in / 1e6 / seconds, 2) if seconds > 0 else None,
        }


def run_unit(stage: ShardStage[Any], src_dir: str, out_dir: str, name: str) -> Stats:
    """One unit of work: the input shard `src_dir/name` into `out_dir/<output>/name`.

    Module-level, with plain arguments and a small result: it may run in another process.
    """
    started = time.monotonic()
    stage.setup()
    out = {folder: ShardFileWriter(Path(out_dir) / folder / name, schema) for folder, schema in stage.outputs.items()}
    stats = Stats()
    for batch in iter_batches(Path(src_dir) / name, list(Document._fields), stage.batch_chars):
        for doc_id, text, source in zip(*(batch.column(c).to_pylist() for c in Document._fields), strict=True):
            text = text or ""
            stats.add("docs")
            stats.add("chars_in", len(text))
            stage.process(Document(doc_id, text, source), out, stats)
        for writer in out.values():
            writer.flush()
        del batch
    for writer in out.values():
        writer.close()
    stats.add("unit_seconds", time.monotonic() - started)
    return stats
