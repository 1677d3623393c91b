"""The pipeline config: one YAML file, one section per stage, validated before any work.

Each stage owns its section's model (`ember.tasks.<stage>`); this module only composes them,
so a stage never sees another stage's settings. Unknown keys and bad values fail with the key
path (`train.lr: Input should be greater than 0`, `train.lerning_rate: unknown key (did you mean
lr?)`), and source paths are checked to exist.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ember.storage.objects import is_url, open_store
from ember.storage.store import DEFAULT_ROOT, ROOT_ENV, Store, canonical_json
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

# An unknown key with no close match lists the valid keys at its level when there are at most this many.
MAX_LISTED_KEYS = 8


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key path."""


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None,
        description=f"store folder, or a URL fsspec opens (s3://bucket/ember); default "
        f"${ROOT_ENV} or {DEFAULT_ROOT}/ in the working directory",
    )
    lock_timeout_s: float = Field(
        3600.0, gt=0, description="how long a run waits for another run writing the same artifact"
    )


class ScheduleConfig(BaseModel):
    """When the `retrain` deployment runs by itself, and how often the corpus watcher looks."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(
        "0 3 * * *", description="retrain on this cron schedule (default nightly, 03:00); null = none"
    )
    timezone: str = Field("UTC", description="the cron schedule's time zone (IANA name)")
    interval_seconds: float | None = Field(None, gt=0, description="also retrain every N seconds (tests, demos)")
    watch_seconds: float | None = Field(
        600, gt=0, description="check the sources this often and retrain when they changed; null = no watcher"
    )

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
        "sequential",
        description="sequential: one after the other in the flow's process; processes: a local "
        "process pool (Prefect's ProcessPoolTaskRunner); dask: a Dask cluster (prefect-dask's DaskTaskRunner)",
    )
    workers: int = Field(2, ge=1, description="units running at once (pool processes; Dask workers without an address)")
    address: str | None = Field(
        None,
        description="dask only: a scheduler address such as tcp://10.0.0.5:8786; null = a local cluster "
        "of `workers` single-threaded processes, started for each stage that needs it",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
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

    def store_root(self, override: str | Path | None = None) -> str:
        """CLI flag, then $EMBER_HOME, then the config's `store.root`, then `.ember/`: a folder (made
        absolute) or a URL such as s3://bucket/ember (ember.storage.objects)."""
        location = str(override or os.environ.get(ROOT_ENV) or self.store.root or DEFAULT_ROOT)
        return location if is_url(location) else str(Path(location).absolute())

    def pinned(self) -> PipelineConfig:
        """This config with `store.root` resolved here ($EMBER_HOME, the config's, or .ember/ in
        this directory): what a run started elsewhere (a subprocess, a worker) must be given."""
        return self.model_copy(update={"store": self.store.model_copy(update={"root": self.store_root()})})

    def open_store(self, override: str | Path | None = None) -> Store:
        return open_store(self.store_root(override), lock_timeout_s=self.store.lock_timeout_s)


def _members(annotation: object) -> list[object]:
    """The types a value of `annotation` can be: unions and Optional split, Annotated unwrapped."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _name(kind: object) -> str:
    return getattr(kind, "__name__", None) or str(kind)


def _models_at(loc: tuple[int | str, ...], root: type[BaseModel]) -> list[type[BaseModel]]:
    """The pydantic models that the mapping at `loc` (a validation error's location, without its
    last part) is validated as: walked from `root` through fields, list/tuple items, dict values
    and union members (PipelineConfig, ("download", "sources", 0) -> [Source])."""
    kinds: list[object] = [root]
    for part in loc:
        # A union's error location names the member tried ("Source", "list[str]"): follow it.
        tagged = [kind for kind in kinds if _name(kind) == part]
        if tagged:
            kinds = tagged
            continue
        following: list[object] = []
        for kind in kinds:
            origin = get_origin(kind)
            if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(part, str):
                field = next((f for name, f in kind.model_fields.items() if (f.alias or name) == part), None)
                if field is not None:
                    following += _members(field.annotation)
            elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
                args = [arg for arg in get_args(kind) if arg is not Ellipsis]
                following += [member for arg in args for member in _members(arg)]
            elif origin is dict and len(get_args(kind)) == 2:
                following += _members(get_args(kind)[1])
        kinds = following
    return [kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _suggestion(key: int | str, models: list[type[BaseModel]]) -> str:
    """What to add to "unknown key": the closest valid key at that level, else the valid keys if
    there are a few, else nothing."""
    fields: dict[str, str] = {}
    for model in models:
        for name, field in model.model_fields.items():
            fields.setdefault(field.alias or name, field.description or "")
    if not fields or not isinstance(key, str):
        return ""
    # By spelling: "lerning_rate" is not close to "lr", but "max_step" is to "max_steps".
    by_lower = {name.lower(): name for name in fields}
    close = difflib.get_close_matches(key.lower().replace("-", "_"), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {by_lower[close[0]]}?)"
    # By meaning, for a key of two words or more ("learning_rate", "lerning_rate"): the field whose
    # description has those words, nearly as spelled; among equals, the one they describe most of
    # ("peak learning rate" -> lr, before "learning rate at the end of the cosine decay" -> min_lr).
    words = _words(key)
    if len(words) >= 2:
        phrase, best = " ".join(words), None
        for name, description in fields.items():
            text = _words(description)
            for start in range(len(text) - len(words) + 1):
                window = " ".join(text[start : start + len(words)])
                score = (round(difflib.SequenceMatcher(None, phrase, window).ratio(), 2), len(words) / len(text))
                if score[0] >= 0.85 and (best is None or score > best[0]):
                    best = (score, name)
        if best:
            return f" (did you mean {best[1]}?)"
    if len(fields) <= MAX_LISTED_KEYS:
        return f" (valid keys: {', '.join(fields)})"
    return ""


def format_validation_error(err: ValidationError, origin: str, root: type[BaseModel] | None = None) -> str:
    """One line per problem, with its key path; an unknown key gets the closest valid key at its
    level. `root`: the model that was validated (default PipelineConfig)."""
    lines = [f"{origin}: invalid config"]
    for problem in err.errors():
        path = ""
        for part in problem["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if problem["type"] == "extra_forbidden":
            level = _models_at(problem["loc"][:-1], root or PipelineConfig)
            message = "unknown key" + _suggestion(problem["loc"][-1], level)
        else:
            message = problem["msg"]
        lines.append(f"  {path or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], origin: str = "config") -> PipelineConfig:
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

    def resolved(value: object) -> object:
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
