"""The CLI fails fast on bad configs and bad sources, naming the key or path, touching nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from pipeline_configs import TINY, write_config

REPO = Path(__file__).resolve().parents[1]


def ember(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "ember.flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "sections, expected",
    [
        pytest.param({"trian": {"lr": 0.1}}, "trian: unknown key", id="unknown_section"),
        pytest.param({"train": {"lr": 0.1, "learning_rate": 3}}, "train.learning_rate: unknown key", id="unknown_key"),
        pytest.param({"train": {"lr": -1}}, "train.lr: Input should be greater than", id="bad_value"),
        pytest.param(
            {"train_tokenizer": {"vocab_size": "big"}},
            "train_tokenizer.vocab_size: Input should be a valid integer",
            id="bad_type",
        ),
        pytest.param(
            {"download": {"sources": [{"path": "/nonexistent/corpus"}]}},
            "/nonexistent/corpus",
            id="missing_source_path",
        ),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, sections, expected):
    config = write_config(tmp_path, **sections)
    result = ember("run", str(config), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "make_source, expected",
    [
        pytest.param(lambda d: (d / "empty").mkdir() or d / "empty", "empty", id="empty_folder"),
        pytest.param(
            lambda d: (d / "blank.txt").write_text("  \n\n") and d / "blank.txt", "blank.txt", id="blank_file"
        ),
        pytest.param(
            lambda d: (d / "notext.jsonl").write_text('{"body": "hello"}\n') and d / "notext.jsonl",
            "notext.jsonl",
            id="jsonl_without_text_field",
        ),
    ],
)
def test_source_without_text_fails_naming_it(tmp_path, make_source, expected):
    source = make_source(tmp_path)
    config = write_config(tmp_path, download={"sources": [{"path": str(source)}]})
    result = ember("run", str(config), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "store").exists()


def test_relative_paths_are_read_from_the_config_folder(tmp_path):
    from ember.flows.config import load_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("some text")
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **TINY,
                "download": {"sources": [{"path": "../data"}]},
                "evaluate": {"external": ["../data/a.txt", "/abs/b.txt"]},
            }
        )
    )
    config = load_config(path)
    assert config.download.sources[0].path == str(tmp_path / "data")
    assert config.evaluate.external == [str(tmp_path / "data" / "a.txt"), "/abs/b.txt"]


def test_unknown_stage_for_force(tmp_path):
    config = write_config(tmp_path)
    result = ember("run", str(config), "--force", "tokenise", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2
    said = " ".join(result.stderr.replace("│", " ").split())
    assert "'tokenise' is not one of 'download', 'normalize'" in said and "'tokenize'" in said, result.stderr
    assert not (tmp_path / "store").exists()


def test_help_lists_the_stages_and_version_prints(tmp_path):
    from ember.tasks.stages import STAGE_NAMES

    result = ember("run", "--help", cwd=tmp_path)
    said = " ".join(result.stdout.replace("│", " ").split())
    assert result.returncode == 0 and "stages, in order: " + ", ".join(STAGE_NAMES) in said, result.stdout
    version = ember("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"ember {metadata.version('ember-llm')}"


def test_ls_show_verify_on_an_empty_store(tmp_path):
    result = ember("ls", "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = ember("verify", "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 0 and "0 artifacts verified" in result.stdout
    result = ember("show", "abc", "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 2 and "no artifact matches 'abc'" in result.stderr


def _reporting_stage(cfg, ctx):
    (ctx.out / "x.txt").write_text("x")
    ctx.report.table("counts", [{"rule": "min_words", "docs": 1234}], "Documents removed per rule")
    ctx.report.markdown("summary", "**5 of 6** documents kept.")
    return {"kept": 5}


def test_show_renders_the_stage_report_and_json_keeps_it(tmp_path):
    from ember.storage.store import Store
    from ember.tasks.stage import Stage, run_stage

    outcome = run_stage(Store(tmp_path / "s"), Stage("filter", 1, _reporting_stage), None, {})
    result = ember("show", outcome.ref[:12], "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Documents removed per rule" in result.stdout and "1,234" in result.stdout
    assert "|---|" not in result.stdout and "**" not in result.stdout  # rendered, not raw Markdown
    raw = ember("show", outcome.ref[:12], "--json", "--store", str(tmp_path / "s"), cwd=tmp_path)
    report = json.loads(raw.stdout)["report"]
    assert [section["key"] for section in report] == ["counts", "summary"]
