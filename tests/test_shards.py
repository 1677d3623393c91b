"""The shard helpers every data stage shares: reading rows in bounded batches, writing one output
file a batch at a time (nothing under its name until it is whole), and counts that merge."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ember.storage.shards import TEXT_SCHEMA, ShardFileWriter, document_ids, iter_batches, read_rows, read_shard
from ember.tasks.shard_stage import Stats


@pytest.fixture
def shard(tmp_path):
    # Distinct texts of 100-700 characters (repeated ones would be dictionary-encoded, and the
    # footer would then say the shard holds far fewer characters than it does).
    rows = [{"id": f"d{i}", "text": f"{i:04d} " * ((i % 7 + 1) * 20), "source": "s"} for i in range(500)]
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=TEXT_SCHEMA), path, row_group_size=64)
    return path, rows


@pytest.mark.parametrize(
    "start, stop",
    [(0, None), (0, 500), (10, 20), (63, 65), (499, 500), (130, 130)],
    ids=["all", "all_explicit", "inside_a_group", "across_groups", "last_row", "empty"],
)
def test_iter_batches_gives_exactly_the_rows_asked_for(shard, start, stop):
    path, rows = shard
    batches = list(iter_batches(path, ["id"], batch_chars=3000, start=start, stop=stop))
    assert [r["id"] for b in batches for r in b.to_pylist()] == [r["id"] for r in rows[start:stop]]
    assert all(b.num_rows <= 32 for b in batches)  # about 3,000 characters each, not the whole shard
    assert read_rows(path, ["id", "text"], start, stop).to_pylist() == [
        {"id": r["id"], "text": r["text"]} for r in rows[start:stop]
    ]


def test_shard_file_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out" / "part-00000.parquet"
    writer = ShardFileWriter(path, TEXT_SCHEMA)
    writer.add({"id": "a", "text": "one", "source": "s"})
    writer.flush()
    writer.write(pa.Table.from_pylist([{"id": "b", "text": "two", "source": "s"}], schema=TEXT_SCHEMA))
    assert not path.exists() and path.with_name(path.name + ".partial").exists()  # a crash here leaves no shard
    writer.add({"id": "c", "text": "three", "source": "s"})
    writer.close()
    assert pq.read_table(path).column("id").to_pylist() == ["a", "b", "c"] and writer.count == 3
    assert not path.with_name(path.name + ".partial").exists()

    empty = ShardFileWriter(tmp_path / "out" / "part-00001.parquet", TEXT_SCHEMA)
    empty.close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-00000.parquet"]  # no rows, no file


def test_stats_merge_in_order():
    first, second = Stats(), Stats()
    first.add("docs", 3)
    first.add("removed", key="min_words")
    first.first("example", "min_words", "doc-1")
    second.add("docs", 2)
    second.add("removed", 2, key="min_words")
    second.add("removed", key="language")
    second.first("example", "min_words", "doc-9")
    second.first("example", "language", "doc-7")
    merged = Stats().merge(first).merge(second)
    assert merged.total("docs") == 5 and merged.total("never counted") == 0
    assert merged.keyed("removed") == {"min_words": 3, "language": 1}
    assert merged.firsts["example"] == {"min_words": "doc-1", "language": "doc-7"}  # the earlier unit's example


def test_document_ids_are_read_and_a_missing_one_names_the_shard(shard, tmp_path):
    path, rows = shard
    assert document_ids(read_shard(path, ["id"]), path) == [r["id"] for r in rows]
    broken = tmp_path / "part-00001.parquet"
    pq.write_table(pa.Table.from_pylist([*rows[:3], {**rows[3], "id": None}], schema=TEXT_SCHEMA), broken)
    with pytest.raises(ValueError, match=f"{broken}: a document has no id"):
        document_ids(read_shard(broken, ["id", "text"]), broken)
