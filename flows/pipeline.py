"""The pipeline flow: every stage in order, each a task over the content-addressed store.

Tasks pass refs (`stage/sha256`), never data. A stage whose artifact is already complete
does no work and shows as "Cached"; `force` reruns named stages, `from_stage` reruns a stage
and everything after it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from ember.flows.config import PipelineConfig
from ember.storage.store import Store
from ember.tasks import dedup, download, evaluate, normalize, publish, quantize, tokenize, train, train_tokenizer
from ember.tasks import filter as quality_filter
from ember.tasks.prefect_stage import UnitMap, artifact_key, stage_task
from ember.tasks.stage import Outcome

STAGES = [download.STAGE, normalize.STAGE, quality_filter.STAGE, dedup.STAGE, train_tokenizer.STAGE,
          tokenize.STAGE, train.STAGE, quantize.STAGE, evaluate.STAGE, publish.STAGE]
STAGE_NAMES = [stage.name for stage in STAGES]


def stages_to_force(force: list[str] | None, from_stage: str | None) -> set[str]:
    unknown = [name for name in [*(force or []), *([from_stage] if from_stage else [])] if name not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)}; stages are: {', '.join(STAGE_NAMES)}")
    forced = set(force or [])
    if from_stage:
        forced.update(STAGE_NAMES[STAGE_NAMES.index(from_stage):])
    return forced


# Where `ember demo` and the `demo` deployment listen unless told otherwise.
DEMO_URL = "http://127.0.0.1:7860"


def release_markdown(release: str, reason: str, store_root: Path) -> str:
    """The run's release artifact: links to the release folder and to the demo, and how to start it."""
    latest = store_root / "releases" / "latest"
    if release:
        head = f"**Release:** [{Path(release).name}]({Path(release).as_uri()}) (`{release}`)"
    elif latest.exists():
        head = (f"**{reason}**\n\nStill published: [{latest.resolve().name}]({latest.resolve().as_uri()}) "
                f"(`{latest.resolve()}`)")
    else:
        return f"**{reason}**"
    return (f"{head}\n\n**Demo:** [{DEMO_URL}]({DEMO_URL}), which serves `releases/latest` once started: "
            f"`prefect deployment run 'ember-demo/demo'` (with `make serve` running) or "
            f"`ember demo --store {store_root}`")


def _run_name() -> str:
    config = flow_run.parameters["config"]
    if isinstance(config, dict):
        config = PipelineConfig.model_validate(config)
    return f"{config.name}-{config.digest()}"


@flow(name="build-llm", flow_run_name=_run_name, persist_result=False)
def build_llm(config: PipelineConfig, force: list[str] | None = None, from_stage: str | None = None,
              store_root: str | None = None) -> dict:
    """Raw text to a published model. Returns each stage's ref, whether it was cached, and the release."""
    logger = get_run_logger()
    forced = stages_to_force(force, from_stage)
    # Fails before any work when a source is missing or has no text; its fingerprint
    # (each file's content hash, a url's checksum or ETag) joins the download key so that a changed corpus reruns it.
    identity = download.preflight(config.download)
    store = Store(config.store_root(store_root), lock_timeout_s=config.store.lock_timeout_s)
    logger.info("store: %s", store.root)
    outcomes: dict[str, Outcome] = {}
    mapper = UnitMap(config.runner.kind, config.runner.workers, config.runner.address)

    def run(stage, cfg, inputs: list[str], identity=None) -> str:
        state = stage_task(store, stage, cfg, {name: outcomes[name].ref for name in inputs},
                           force=stage.name in forced, identity=identity,
                           artifact_prefix=config.name, mapper=mapper, return_state=True)
        outcome: Outcome = state.result()
        outcomes[stage.name] = outcome
        how = "cache hit" if outcome.cached else f"ran in {outcome.seconds:.1f}s"
        logger.info("%-15s %s  %s", stage.name, how, outcome.ref[: len(stage.name) + 13])
        return outcome.ref

    run(download.STAGE, config.download, [], identity=identity)
    run(normalize.STAGE, config.normalize, ["download"])
    run(quality_filter.STAGE, config.filter, ["normalize"])
    run(dedup.STAGE, config.dedup, ["filter"])
    run(train_tokenizer.STAGE, config.train_tokenizer, ["dedup"])
    tokens = run(tokenize.STAGE, config.tokenize, ["dedup", "train_tokenizer"])
    # `warm_start: true` becomes one release (config) and its weights' digest (identity): both key the run.
    train_cfg, init_weights = train.plan_warm_start(config.train, store.root, tokens)
    run(train.STAGE, train_cfg, ["tokenize", "train_tokenizer"], identity=init_weights)
    run(quantize.STAGE, config.quantize, ["train"])
    run(evaluate.STAGE, config.evaluate, ["train", "quantize", "tokenize", "train_tokenizer"])
    run(publish.STAGE, config.publish, ["train", "quantize", "evaluate", "train_tokenizer", "tokenize",
                                        "download", "normalize", "filter", "dedup"])  # the card's data section

    refs = {name: outcome.ref for name, outcome in outcomes.items()}
    store.record_run(config.name, refs, {"flow_run_id": str(flow_run.id or ""), "config_digest": config.digest()})
    published = outcomes["publish"].metrics
    release = published.get("path", "")
    create_table_artifact(
        key=artifact_key(config.name, "stages"),
        table=[{"stage": name, "cached": o.cached, "seconds": round(o.seconds, 1), "ref": o.ref}
               for name, o in outcomes.items()],
        description="What each stage did in this run (cached = found complete in the store)",
    )
    create_markdown_artifact(
        key=artifact_key(config.name, "release"),
        markdown=release_markdown(release, published.get("reason", "not published"), store.root),
        description="The published model and how to try it",
    )
    return {
        "store": str(store.root),
        "release": release,
        "not_published": "" if release else published.get("reason", "not published"),
        "stages": [{"stage": name, "cached": o.cached, "seconds": o.seconds, "ref": o.ref}
                   for name, o in outcomes.items()],
    }
