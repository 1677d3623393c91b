"""An unknown config key is named with the closest valid key at its level ("did you mean"), or
with the valid keys when there are few, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ember.flows.config import ConfigError, format_validation_error, load_config, parse_config


def write_yaml(tmp_path: Path, config: dict, name: str = "bad.yaml") -> Path:
    """A config with one real source (a file in tmp_path) and `config`'s sections."""
    (tmp_path / "corpus.txt").write_text("Some text to train on.\n" * 20, encoding="utf-8")
    data = {"download": {"sources": [{"path": "corpus.txt"}]}}
    for section, value in config.items():
        data[section] = {**data[section], **value} if section == "download" else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def problems(tmp_path: Path, config: dict) -> list[str]:
    """The lines of load_config's error for `config`, without the heading."""
    with pytest.raises(ConfigError) as caught:
        load_config(write_yaml(tmp_path, config))
    heading, *lines = str(caught.value).splitlines()
    assert heading.endswith("bad.yaml: invalid config")
    return [line.strip() for line in lines]


@pytest.mark.parametrize(
    "config, expected",
    [
        # A misspelt field of a stage section.
        ({"train": {"lerning_rate": 1e-3}}, "train.lerning_rate: unknown key (did you mean lr?)"),
        # Named as other trainers name it: found by the field's description ("peak learning rate").
        ({"train": {"learning_rate": 1e-3}}, "train.learning_rate: unknown key (did you mean lr?)"),
        ({"train": {"max_step": 10}}, "train.max_step: unknown key (did you mean max_steps?)"),
        ({"train": {"batch-size": 8}}, "train.batch-size: unknown key (did you mean batch_size?)"),
        ({"train": {"LR": 1e-3}}, "train.LR: unknown key (did you mean lr?)"),
        # A section name.
        ({"trian": {"lr": 1e-3}}, "trian: unknown key (did you mean train?)"),
        ({"filters": {}}, "filters: unknown key (did you mean filter?)"),
        # Nested sections and the models inside a list.
        ({"train": {"model": {"dimm": 64}}}, "train.model.dimm: unknown key (did you mean dim?)"),
        ({"download": {"http": {"atempts": 3}}}, "download.http.atempts: unknown key (did you mean attempts?)"),
        (
            {"download": {"sources": [{"path": "corpus.txt", "txt_field": "body"}]}},
            "download.sources[0].txt_field: unknown key (did you mean text_field?)",
        ),
        (
            {"download": {"sources": [{"path": "corpus.txt"}, {"pth": "corpus.txt", "name": "again"}]}},
            "download.sources[1].pth: unknown key (did you mean path?)",
        ),
        ({"dedup": {"n_gram": 3}}, "dedup.n_gram: unknown key (did you mean ngram?)"),
        # Nothing close, and a level with few keys: they are listed.
        ({"runner": {"threads": 4}}, "runner.threads: unknown key (valid keys: kind, workers, address)"),
        ({"store": {"path": "x"}}, "store.path: unknown key (valid keys: root, lock_timeout_s)"),
        # Nothing close among many keys: nothing is guessed.
        ({"train": {"epochs": 3}}, "train.epochs: unknown key"),
        ({"colour": "red"}, "colour: unknown key"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(tmp_path, config, expected):
    assert expected in problems(tmp_path, config)


def test_every_unknown_key_is_listed_with_its_own_suggestion(tmp_path):
    lines = problems(
        tmp_path, {"trian": {}, "train": {"lerning_rate": 1, "epochs": 2}, "download": {"chunk_char": 100}}
    )
    assert sorted(lines) == sorted(
        [
            "trian: unknown key (did you mean train?)",
            "train.lerning_rate: unknown key (did you mean lr?)",
            "train.epochs: unknown key",
            "download.chunk_char: unknown key (did you mean chunk_chars?)",
        ]
    )


def test_other_errors_are_unchanged():
    source = {"sources": [{"path": "/tmp"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config({"download": source, "train": {"lr": -1}}, origin="inline")
    assert str(caught.value).splitlines() == ["inline: invalid config", "  train.lr: Input should be greater than 0"]


def test_unions_lists_and_dicts_are_walked():
    """Error locations through a union name the member tried ("x.A.alpah"); a dict's through
    its key; a list's through the index."""

    class A(BaseModel):
        model_config = ConfigDict(extra="forbid")
        alpha: int = 1

    class B(BaseModel):
        model_config = ConfigDict(extra="forbid")
        beta: int = 1

    class Top(BaseModel):
        model_config = ConfigDict(extra="forbid")
        x: A | B = A()
        y: list[A] | None = None
        z: dict[str, B] = {}

    with pytest.raises(ValidationError) as caught:
        Top.model_validate({"x": {"alpah": 1}, "y": [{"alhpa": 1}], "z": {"k": {"betta": 1}}, "w": 0})
    lines = format_validation_error(caught.value, "top", root=Top).splitlines()
    assert lines[0] == "top: invalid config"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "x.A.alpah: unknown key (did you mean alpha?)",
            "x.B.alpah: unknown key (valid keys: beta)",
            "y[0].alhpa: unknown key (did you mean alpha?)",
            "z.k.betta: unknown key (did you mean beta?)",
            "w: unknown key (valid keys: x, y, z)",
        ]
    )


def test_cli_prints_the_suggestion_and_exits_2(tmp_path):
    """`.venv/bin/ember run bad.yaml`: the installed command, as a user types it."""
    config = write_yaml(tmp_path, {"train": {"lerning_rate": 1e-3}})
    ember = Path(sys.executable).parent / "ember"
    assert ember.exists(), f"the ember command is not installed beside {sys.executable}"
    result = subprocess.run(
        [str(ember), "run", str(config), "--store", str(tmp_path / "store")],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "train.lerning_rate: unknown key (did you mean lr?)" in result.stderr
    assert not (tmp_path / "store").exists()
