"""End to end under a real Prefect server: all ten stages, cache hits, partial reruns, the demo."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ember.flows.config import load_config
from pipeline_configs import settled_task_runs, write_config

pytestmark = pytest.mark.slow

ALL = [
    "download",
    "normalize",
    "filter",
    "dedup",
    "train_tokenizer",
    "tokenize",
    "train",
    "quantize",
    "evaluate",
    "publish",
]


def run_pipeline(config_path: Path, store: Path, **kwargs):
    from ember.flows.pipeline import build_llm

    state = build_llm(load_config(config_path), store_root=str(store), return_state=True, **kwargs)
    summary = state.result()
    return summary, state.state_details.flow_run_id


def flow_run_name(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def ran(summary) -> list[str]:
    return [row["stage"] for row in summary["stages"] if not row["cached"]]


def task_state_names(flow_run_id) -> dict[str, str | None]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = settled_task_runs(client, flow_run_id)
    return {run.name: run.state.name if run.state else None for run in runs}


@pytest.fixture(scope="module")
def built(prefect_api, tmp_path_factory):
    """One full run of the tiny config; later tests build on its store."""
    folder = tmp_path_factory.mktemp("e2e")
    config = write_config(folder)
    store = folder / "store"
    summary, flow_run_id = run_pipeline(config, store)
    return folder, config, store, summary, flow_run_id


def test_first_run_runs_every_stage_and_publishes(built):
    folder, config, store, summary, flow_run_id = built
    assert ran(summary) == ALL
    release = Path(summary["release"])
    assert release.parent == store / "releases" and (store / "releases" / "latest").resolve() == release
    for name in [
        "model.safetensors",
        "model-int8.safetensors",
        "tokenizer.json",
        "config.json",
        "report.json",
        "release.json",
        "model-int8-wo.safetensors",
        "loss.png",
        "hf/config.json",
        "hf/model.safetensors",
        "model-f16.gguf",
        "model-q8_0.gguf",
    ]:
        assert (release / name).is_file(), name
    assert set(task_state_names(flow_run_id).values()) == {"Completed"}
    assert flow_run_name(flow_run_id) == f"build-tiny-{load_config(config).digest()}"
    assert "![loss curve](loss.png)" in (release / "report.md").read_text()
    assert (release / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_artifacts(flow_run_id) -> dict:
    """The run's artifacts by key (each key once: a second artifact under a key would be clutter)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    keys = [a.key for a in found]
    assert len(keys) == len(set(keys)), sorted(keys, key=str)
    return {a.key: a for a in found}


def test_each_stage_publishes_one_card_and_progress_reaches_100(built):
    folder, config, store, summary, flow_run_id = built
    artifacts = run_artifacts(flow_run_id)
    stage_keys = {f"tiny-{name.replace('_', '-')}" for name in ALL}
    assert set(artifacts) == stage_keys | {"tiny-progress", "tiny-stages", "tiny-release"}
    for i, name in enumerate(ALL, 1):
        card = artifacts[f"tiny-{name.replace('_', '-')}"]
        assert card.type == "markdown" and card.description.startswith(f"Stage {i} of 10: {name}, ran in")
        assert card.task_run_id is not None and f"## {name} · stage {i} of 10" in card.data
    progress = artifacts["tiny-progress"]
    assert progress.data == 100 and progress.description == "All 10 stages done: 10 ran, 0 cached"
    # The plots are in the cards themselves: the UI cannot read the store's files.
    for name in ("train", "evaluate"):
        assert "![loss curve](data:image/png;base64,iVBORw0KGgo" in artifacts[f"tiny-{name}"].data, name
    assert "| 7 | train | **ran** |" in artifacts["tiny-stages"].data
    assert "file://" not in artifacts["tiny-release"].data and "v0001" in artifacts["tiny-release"].data


def test_second_run_is_all_cache_hits_in_prefect_too(built):
    folder, config, store, first, first_run_id = built
    summary, flow_run_id = run_pipeline(config, store)
    assert ran(summary) == []
    assert [row["ref"] for row in summary["stages"]] == [row["ref"] for row in first["stages"]]
    states = task_state_names(flow_run_id)
    assert sorted(states) == sorted(ALL) and set(states.values()) == {"Cached"}
    assert summary["release"] == first["release"]
    # Each cached stage's card names the run that made its artifact and shows the report it gave.
    first_cards, cards = run_artifacts(first_run_id), run_artifacts(flow_run_id)
    for name in ALL:
        key = f"tiny-{name.replace('_', '-')}"
        assert cards[key].description.endswith(f"{name}, cached")
        assert f"/runs/flow-run/{first_run_id}" in cards[key].data, cards[key].data[:400]
        assert first_cards[key].data.split("\n\n", 2)[2] == cards[key].data.split("\n\n", 2)[2]
    assert "All 10 stages were cached" in cards["tiny-stages"].data


def test_a_warm_start_retrain_over_the_same_corpus_is_all_cache_hits(built):
    """The retrain deployment's config (`warm_start: true`) over an unchanged corpus: the published
    release learned from these very tokens, so nothing trains again."""
    folder, config, store, first, _ = built
    retrain = write_config(folder, "retrain.yaml", train={"warm_start": True})
    summary, _ = run_pipeline(retrain, store)
    assert ran(summary) == []
    assert summary["release"] == first["release"]


def test_changing_a_training_setting_reruns_only_training_and_after(built):
    folder, config, store, _, _ = built
    changed = write_config(folder, "tiny-lr.yaml", train={"lr": 0.003})
    summary, _ = run_pipeline(changed, store)
    assert ran(summary) == ["train", "quantize", "evaluate", "publish"]
    # Published as v0002 only if the gate finds it better than v0001 (test_publish_gate.py).
    assert Path(summary["release"]).name == "v0002" or summary["not_published"].startswith("not published")


def test_deleted_artifact_is_rebuilt(built):
    from ember.storage.store import Store

    folder, config, store, first, _ = built
    refs = {row["stage"]: row["ref"] for row in first["stages"]}
    shutil.rmtree(Store(store).path(refs["tokenize"]))
    summary, _ = run_pipeline(config, store)
    # Tokenization is deterministic: the rebuilt artifact has the same digest, so what was
    # trained on it is still current (see the store's input digests).
    assert ran(summary) == ["tokenize"]
    # So is tokenizer training, and its files hold no timings: the same digest again.
    shutil.rmtree(Store(store).path(refs["train_tokenizer"]))
    summary, _ = run_pipeline(config, store)
    assert ran(summary) == ["train_tokenizer"]
    assert Store(store).verify() == []


def test_force_and_from(built):
    folder, config, store, _, _ = built
    summary, _ = run_pipeline(config, store, force=["normalize"])
    assert ran(summary) == ["normalize"]
    summary, _ = run_pipeline(config, store, from_stage="quantize")
    assert ran(summary) == ["quantize", "evaluate", "publish"]
    # The flow's parameters are enums of the stage names: a typo fails before any stage runs.
    with pytest.raises(Exception, match="force.0: Input should be .download., .normalize."):
        run_pipeline(config, store, force=["tokenise"])


def test_a_retrain_is_named_apart_from_a_build(built):
    folder, config, store, _, _ = built
    summary, flow_run_id = run_pipeline(config, store, purpose="retrain")
    assert flow_run_name(flow_run_id) == f"retrain-tiny-{load_config(config).digest()}"


def test_demo_answers_from_the_published_release(built):
    from gradio_client import Client

    from ember.deployments.app import build_app

    folder, config, store, summary, _ = built
    demo = build_app(store / "releases")
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        text = client.predict("ROMEO:", 24, 0.8, 20, api_name="/generate")
        assert isinstance(text, str) and len(text.strip()) > 0
    finally:
        demo.close()
