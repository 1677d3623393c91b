"""The pipeline flow: every stage of `STAGES` in order, each a task over the content-addressed store.

Tasks pass refs (`stage/sha256`), never data. What a stage reads from outside the store is
decided here: the sources' identity for download, the release a warm start continues from for
train. A stage whose artifact is already complete does no work and shows as "Cached"; `force`
reruns named stages, `from_stage` reruns a stage and everything after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, TypedDict, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from ember.flows.cards import release_markdown, stages_table
from ember.flows.config import PipelineConfig
from ember.flows.prefect_stage import UnitMap, artifact_key, stage_task, ui_url
from ember.storage.releases import LATEST, RELEASE_JSON, WEIGHTS, pick_release
from ember.storage.store import file_sha256
from ember.tasks import download
from ember.tasks.stage import Outcome
from ember.tasks.stages import STAGE_NAMES, STAGES
from ember.tasks.train import TrainConfig

# A stage's name, as the flow's `force` and `from_stage` take it: an enum in the run's parameter
# schema, so the UI offers the names and a typo is refused when the run is created. A type
# checker cannot build a Literal from a list: to it, a stage name is a str.
if TYPE_CHECKING:
    StageName = str
else:
    StageName = Literal[tuple(STAGE_NAMES)]


def stages_to_force(force: list[str] | None, from_stage: str | None) -> set[str]:
    """The stages a run rebuilds. The names are checked before: the flow's parameters are `StageName`s."""
    forced = set(force or [])
    if from_stage:
        forced.update(STAGE_NAMES[STAGE_NAMES.index(from_stage) :])
    return forced


class WarmStart(NamedTuple):
    config: TrainConfig  # `warm_start` resolved: a version, or false
    identity: str | None  # the release's version and weights digest, for the train stage's key
    release: Path | None  # its folder, handed to the stage as ctx.resources["warm_start"]


def plan_warm_start(cfg: TrainConfig, releases: Path, tokens_ref: str | None) -> WarmStart:
    """What a run trains from: `warm_start: true` resolved to one release, or to a cold start.

    The release's version goes into the config and its weights' digest into the identity, so both
    join the train stage's key. A release already trained on these very tokens has nothing new to
    learn from them: a retrain over an unchanged corpus resolves to the release its current model
    started from (or, with none, to a cold start, as a build) and so finds that artifact in the
    store instead of training again every night. A new corpus resolves to the newest release.
    Resolved here, in the flow, so that the train stage never looks at what publish wrote.
    """
    if cfg.warm_start is False:
        return WarmStart(cfg, None, None)
    release: Path | None
    if isinstance(cfg.warm_start, str):
        release = Path(releases) / cfg.warm_start
        if not (release / WEIGHTS).is_file():
            raise ValueError(f"train.warm_start: {release} has no {WEIGHTS}; `ember releases` lists the releases")
    else:
        release = pick_release(Path(releases), tokens_ref)
        if release is None:
            return WarmStart(cfg.model_copy(update={"warm_start": False}), None, None)
    try:
        digest = json.loads((release / RELEASE_JSON).read_text())["files"][WEIGHTS]["sha256"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        digest = file_sha256(release / WEIGHTS)
    return WarmStart(cfg.model_copy(update={"warm_start": release.name}), f"{release.name} sha256:{digest}", release)


# Where `ember demo` and the `demo` deployment listen unless told otherwise.
DEMO_URL = "http://127.0.0.1:7860"

# What a run is for: a build on demand, or a retrain (warm start, publish through the gate).
Purpose = Literal["build", "retrain"]


class StageSummary(TypedDict):
    stage: str
    cached: bool
    seconds: float
    ref: str


class RunSummary(TypedDict):
    """What `build_llm` returns (and `ember run` prints)."""

    store: str  # the store's location: a folder or a URL
    release: str  # the folder of the release this run published, or ""
    not_published: str  # why it published none, or ""
    stages: list[StageSummary]


def retrain_config(config: PipelineConfig) -> PipelineConfig:
    """The config a retrain runs: training warm-starts from the published release when it can,
    and the new model is published only if the gate finds it better (never forced)."""
    return config.model_copy(
        update={
            "train": config.train.model_copy(update={"warm_start": True}),
            "publish": config.publish.model_copy(update={"force": False}),
        }
    )


def run_name(purpose: str, config: PipelineConfig) -> str:
    """`build-<config>-<digest>`: the flow run's name in the UI, and what `ember run` prints."""
    return f"{purpose}-{config.name}-{config.digest()}"


def _run_name() -> str:
    config = flow_run.parameters["config"]
    if isinstance(config, dict):
        config = PipelineConfig.model_validate(config)
    return run_name(flow_run.parameters.get("purpose", "build"), config)


@flow(name="build-llm", flow_run_name=_run_name, persist_result=False)
def build_llm(
    config: PipelineConfig,
    force: list[StageName] | None = None,
    from_stage: StageName | None = None,
    store_root: str | None = None,
    purpose: Purpose = "build",
) -> RunSummary:
    """Raw text to a published model. Returns each stage's ref, whether it was cached, and the release.

    `force` reruns the stages named, `from_stage` a stage and every one after it (the UI offers the
    stage names; anything else is refused when the run is created). `purpose` names the run, and
    a retrain runs `retrain_config(config)`: warm start, published only through the gate.
    """
    logger = get_run_logger()
    if purpose == "retrain":
        config = retrain_config(config)
    forced = stages_to_force(force, from_stage)
    # Fails before any work when a source is missing or has no text; its fingerprint
    # (each file's content hash, a url's checksum or ETag) joins the download key so that a changed corpus reruns it.
    sources = download.preflight(config.download)
    store = config.open_store(store_root)
    logger.info("store: %s", store.location)
    outcomes: dict[str, Outcome] = {}
    mapper = UnitMap(config.runner.kind, config.runner.workers, config.runner.address, store=store)
    # One progress card for the whole run: the stage under way and how far it is.
    # Prefect types it "UUID, or a coroutine in an async context": this flow is sync.
    progress_id = cast(
        UUID,
        create_progress_artifact(
            0.0, key=artifact_key(config.name, "progress"), description=f"Stage 1 of {len(STAGES)}: starting"
        ),
    )

    for stage in STAGES:
        cfg = getattr(config, stage.name)
        identity: object = None
        resources: dict[str, Path] | None = None
        if stage.name == "download":
            identity = sources
        elif stage.name == "train":
            # `warm_start: true` becomes one release (config), its weights' digest (identity, for
            # the key) and its folder (what the stage reads).
            cfg, identity, release = plan_warm_start(cfg, store.sync_releases(), outcomes["tokenize"].ref)
            resources = {"warm_start": release} if release else None
        state = stage_task(
            store,
            stage,
            cfg,
            {name: outcomes[name].ref for name in stage.inputs},
            force=stage.name in forced,
            identity=identity,
            artifact_prefix=config.name,
            mapper=mapper,
            resources=resources,
            stages=STAGE_NAMES,
            progress_id=progress_id,
            return_state=True,
        )
        # `stage_task` returns an Outcome, or on a hit a Completed state holding one, which Prefect
        # makes the task's own: the result is the Outcome either way (Prefect's types miss that).
        outcome = cast(Outcome, state.result())
        outcomes[stage.name] = outcome
        how = "cache hit" if outcome.cached else f"ran in {outcome.seconds:.1f}s"
        logger.info("%-15s %s  %s", stage.name, how, outcome.ref[: len(stage.name) + 13])

    refs = {name: outcome.ref for name, outcome in outcomes.items()}
    store.record_run(config.name, refs, {"flow_run_id": str(flow_run.id or ""), "config_digest": config.digest()})
    published = outcomes["publish"].metrics
    release = published.get("path", "")
    ran = sum(not o.cached for o in outcomes.values())
    update_progress_artifact(
        progress_id, progress=100.0, description=f"All {len(STAGES)} stages done: {ran} ran, {len(STAGES) - ran} cached"
    )
    create_markdown_artifact(
        key=artifact_key(config.name, "stages"),
        markdown=stages_table(list(outcomes.values()), ui_url()),
        description="The stages in order: what each did, and which run made the artifact it used",
    )
    create_markdown_artifact(
        key=artifact_key(config.name, "release"),
        markdown=release_markdown(
            release, published.get("reason", "not published"), store.releases_dir / LATEST, DEMO_URL, store.location
        ),
        description="The published model and how to try it",
    )
    return {
        "store": store.location,
        "release": release,
        "not_published": "" if release else published.get("reason", "not published"),
        "stages": [
            {"stage": name, "cached": o.cached, "seconds": o.seconds, "ref": o.ref} for name, o in outcomes.items()
        ],
    }
