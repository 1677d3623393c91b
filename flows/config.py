"""The pipeline config: one YAML file, one section per stage, validated before any work.

Each stage owns its section's model (`ember.tasks.<stage>`); this module only composes them,
so a stage never sees another stage's settings. Unknown keys and bad values fail with the key
path (`train.lr: Input should be greater than 0`), and source paths are checked to exist.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ember.storage.store import ROOT_ENV, DEFAULT_ROOT, canonical_json
from ember.tasks.dedup import DedupConfig
from ember.tasks.download import DownloadConfig
from ember.tasks.evaluate import EvaluateConfig
from ember.tasks.filter import FilterConfig
from ember.tasks.normalize import NormalizeConfig
from ember.tasks.publish import PublishConfig
from ember.tasks.quantize import QuantizeConfig
from ember.tasks.tokenize import TokenizeConfig
from ember.tasks.train import TrainConfig
from ember.tasks.train_tokenizer import TokenizerConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key path."""


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(None, description=f"store folder; default ${ROOT_ENV} or {DEFAULT_ROOT}/ in the working directory")
    lock_timeout_s: float = Field(3600.0, gt=0, description="how long a run waits for another run writing the same artifact")


class ScheduleConfig(BaseModel):
    """When the `retrain` deployment runs by itself, and how often the corpus watcher looks."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field("0 3 * * *", description="retrain on this cron schedule (default nightly, 03:00); null = none")
    timezone: str = Field("UTC", description="the cron schedule's time zone (IANA name)")
    interval_seconds: float | None = Field(None, gt=0, description="also retrain every N seconds (tests, demos)")
    watch_seconds: float | None = Field(
        600, gt=0, description="check the sources this often and retrain when they changed; null = no watcher")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from prefect.schedules import Cron

            Cron(value)  # ValueError: Invalid cron string
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Paris)") from None
        return value


class RunnerConfig(BaseModel):
    """How a stage's independent units (one per shard) run under Prefect. The output is the same
    byte for byte whichever runs them; only where and how many at once changes."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sequential", "processes", "dask"] = Field(
        "sequential", description="sequential: one after the other in the flow's process; processes: a local "
        "process pool (Prefect's ProcessPoolTaskRunner); dask: a Dask cluster (prefect-dask's DaskTaskRunner)")
    workers: int = Field(2, ge=1, description="units running at once (pool processes; Dask workers without an address)")
    address: str | None = Field(
        None, description="dask only: a scheduler address such as tcp://10.0.0.5:8786; null = a local cluster "
        "of `workers` single-threaded processes, started for each stage that needs it")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> "RunnerConfig":
        if self.address and self.kind != "dask":
            raise ValueError(f"address is for kind dask, not {self.kind}")
        return self


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs. `prefect deployment run` takes the same fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("ember", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names runs and releases")
    store: StoreConfig = StoreConfig()
    download: DownloadConfig
    normalize: NormalizeConfig = NormalizeConfig()
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    train_tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    publish: PublishConfig = PublishConfig()
    # How it runs, not what it makes: neither section is part of any stage's key.
    schedule: ScheduleConfig = ScheduleConfig()
    runner: RunnerConfig = RunnerConfig()

    def digest(self) -> str:
        """Short content hash of the config, to name flow runs."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()[:8]

    def store_root(self, override: str | Path | None = None) -> Path:
        """CLI flag, then $EMBER_HOME, then the config's `store.root`, then `.ember/`."""
        return Path(override or os.environ.get(ROOT_ENV) or self.store.root or DEFAULT_ROOT).absolute()


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid config"]
    for problem in err.errors():
        path = ""
        for part in problem["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"  {path or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: dict, origin: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML config. Relative source paths are taken from the config file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    folder = path.resolve().parent

    def resolved(value):
        if not isinstance(value, str):
            return value  # the model's validation names the bad type
        value = os.path.expanduser(value)
        return value if os.path.isabs(value) else os.path.normpath(folder / value)

    download, evaluate = data.get("download"), data.get("evaluate")
    sources = download.get("sources") if isinstance(download, dict) else None
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict) and "path" in source:
            source["path"] = resolved(source["path"])
    if isinstance(evaluate, dict) and isinstance(evaluate.get("external"), list):
        evaluate["external"] = [resolved(item) for item in evaluate["external"]]
    return parse_config(data, origin=str(path))
