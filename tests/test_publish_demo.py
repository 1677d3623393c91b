"""publish (versions, latest, idempotence, no half releases, the model card) and the Gradio demo
over a real server: every control through gradio_client, bad input, login."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml

from demo_release import PROMPT, tiny_release_store
from ember.model.checkpoint import save_model
from ember.model.quantize import quantize_int8, save_int8
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.storage.shards import ShardWriter
from ember.tasks import publish, train_tokenizer
from ember.tasks.stage import Reporter, StageContext
from helpers import stage_context

VOCAB = 512


def make_ctx(tmp_path: Path, name: str, inputs: dict[str, Path], store_root: Path) -> StageContext:
    return stage_context(
        tmp_path / name, "out", inputs, work=tmp_path / name / "work", store_root=store_root, reporter=Reporter(name)
    )


def fake_ref(stage: str, label: str) -> str:
    return f"{stage}/{hashlib.sha256(label.encode()).hexdigest()}"


def write_manifest(folder: Path, stage: str, label: str, metrics: dict | None = None) -> None:
    (folder / "manifest.json").write_text(json.dumps({"ref": fake_ref(stage, label), "metrics": metrics or {}}))


def build_tokenizer(root: Path, source: str, texts: list[str]) -> Path:
    """A train_tokenizer artifact (the real stage, VOCAB tokens) trained on `texts`."""
    with ShardWriter(root / "dedup" / "shards") as writer:
        writer.write_many({"id": f"{source}:{i}", "text": t, "source": source} for i, t in enumerate(texts))
    ctx = make_ctx(root, "tok", {"dedup": root / "dedup"}, root / "store")
    train_tokenizer.run(train_tokenizer.TokenizerConfig(vocab_size=VOCAB), ctx)
    write_manifest(ctx.out, "train_tokenizer", f"tok-{source}")
    return ctx.out


def shakespeare_tokenizer(root: Path, corpora: Path) -> Path:
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    return build_tokenizer(root, "shakespeare", text.split("\n\n"))


def poetry_tokenizer(root: Path, corpora: Path) -> Path:
    """A Chinese vocabulary: the first 1,000 poems of the shared classical poetry."""
    with open(corpora / "chinese_poetry" / "chinese_poetry.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in islice(f, 1000)]
    return build_tokenizer(root, "poetry", texts)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpora) -> Path:
    return shakespeare_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpora)


def make_inputs(
    root: Path, tokenizer_dir: Path, label: str, seed: int = 0, prompts: tuple[str, ...] = ()
) -> dict[str, Path]:
    """train / quantize / evaluate artifact folders around a tiny random model; `prompts` are
    the evaluate stage's (its samples in report.json)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, **PRESETS["tiny"])).eval()
    extra = {
        "tokenizer": {"bos_id": 1, "eos_id": 2, "pad_id": 0},
        "train": {"steps": 0, "tokens": 0, "seconds": 0.0, "train_loss": 6.2, "val_loss": 6.3},
    }
    folders = {stage: root / label / stage for stage in ("train", "quantize", "evaluate")}
    save_model(model, folders["train"], extra)
    (folders["train"] / "loss.jsonl").write_text(json.dumps({"step": 0, "loss": 6.2, "lr": 0.0}) + "\n")
    save_int8(quantize_int8(model), folders["quantize"], extra)
    folders["evaluate"].mkdir(parents=True)
    (folders["evaluate"] / "report.json").write_text(
        json.dumps(  # the shape of a real report, in short
            {
                "models": ["fp32"],
                "fp32": {"val_loss": 6.3, "bpb": 3.1, "file_bytes": 1},
                "samples": {"fp32": [{"prompt": p, "completion": "…"} for p in prompts]},
            }
        )
    )
    (folders["evaluate"] / "report.md").write_text(f"# Report {label}\n\nval loss 6.3\n")
    for stage, folder in folders.items():
        write_manifest(folder, stage, f"{label}-{stage}", {"label": label})
    return {**folders, "train_tokenizer": tokenizer_dir}


ZH_PROMPT = "却说曹操"  # the Chinese release's own evaluate prompt


def publish_two_languages(root: Path, corpora: Path) -> Path:
    """A releases folder holding an English model (v0001, Shakespeare's vocabulary) and a Chinese
    one (v0002, classical poetry's), `latest` on the Chinese. Each one's evaluate prompts include
    one in the other language (as a Chinese run left at the English default prompts would have).
    Random weights: what is tested is what the demo shows around them."""
    store = root / "store"
    english = make_inputs(root, shakespeare_tokenizer(root / "en", corpora), "en", prompts=("To be", "床前明月光，"))
    chinese = make_inputs(
        root, poetry_tokenizer(root / "zh", corpora), "zh", seed=1, prompts=(ZH_PROMPT, "Once upon a time")
    )
    for name, inputs in (("en", english), ("zh", chinese)):
        publish.run(
            publish.PublishConfig(gate=False, gguf=[], export_hf=False),
            make_ctx(root, f"publish-{name}", inputs, store),
        )
    return store / "releases"


def run_publish(tmp_path: Path, name: str, inputs: dict[str, Path], store: Path, **cfg) -> tuple[dict, Path]:
    """Versioning without the gate (its models are random); test_publish_gate.py covers the gate."""
    ctx = make_ctx(tmp_path, name, inputs, store)
    return publish.run(publish.PublishConfig(**{"gate": False, **cfg}), ctx), ctx.out


def latest(store: Path) -> str:
    return os.readlink(store / "releases" / "latest")


def versions(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "releases").iterdir() if p.name == "latest" or p.name.startswith("v0"))


# -- publish ----------------------------------------------------------------------------------


def test_versions_latest_and_republish(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a", seed=0)
    b = make_inputs(tmp_path, tokenizer_dir, "b", seed=1)

    metrics, out = run_publish(tmp_path, "p1", a, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0001", True, "v0001")
    release = store / "releases" / "v0001"
    expected = {
        "model.safetensors",
        "model-int8.safetensors",
        "config.json",
        "loss.jsonl",
        "report.json",
        "report.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "release.json",
        "hf",
        "model-f16.gguf",
        "model-q8_0.gguf",
        "README.md",
        "pipeline.yaml",
    }
    assert {p.name for p in release.iterdir()} == expected
    assert (release / "hf" / "config.json").is_file() and (release / "hf" / "model.safetensors").is_file()
    record = json.loads((release / "release.json").read_text())
    assert record["version"] == "v0001" and record["created"]
    assert record["refs"] == {stage: fake_ref(stage, f"a-{stage}") for stage in ("train", "quantize", "evaluate")} | {
        "train_tokenizer": fake_ref("train_tokenizer", "tok-shakespeare")
    }
    assert record["metrics"]["train"] == {"label": "a"}
    assert (out / "release.json").read_bytes() == (release / "release.json").read_bytes()
    assert (release / "model.safetensors").read_bytes() == (a["train"] / "model.safetensors").read_bytes()
    assert metrics["size_bytes"] == sum(f["size"] for f in record["files"].values())
    # The tokenizer now knows the model's context.
    tokenizer_config = json.loads((release / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == PRESETS["tiny"]["max_seq_len"]

    metrics, _ = run_publish(tmp_path, "p2", b, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0002", True, "v0002")

    # The same inputs again: no new version; latest points back at the release that has them.
    metrics, out = run_publish(tmp_path, "p3", a, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0001", False, "v0001")
    assert json.loads((out / "release.json").read_text())["version"] == "v0001"
    assert versions(store) == ["latest", "v0001", "v0002"]
    assert (store / "releases" / "latest" / "model.safetensors").is_file()  # the relative link resolves


def test_a_release_is_read_only_and_has_a_card(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    run_publish(tmp_path, "p1", make_inputs(tmp_path, tokenizer_dir, "a"), store)
    release = store / "releases" / "v0001"
    files = [p for p in release.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o222 == 0 for p in files)  # nobody may write
    card = (release / "README.md").read_text()
    assert (
        card.startswith("# Ember model v0001")
        and f"- parameters: {sum(p.numel() for p in model_params(release)):,}\n" in card
    )
    # Stand-in artifacts have no download / curation manifests: the card says so rather than guess.
    assert "Not recorded" in card
    record = json.loads((release / "release.json").read_text())
    assert record["files"]["README.md"]["sha256"] and record["lineage"]["train"] == fake_ref("train", "a-train")


def model_params(folder: Path):
    from ember.model.checkpoint import load_model

    return list(load_model(folder).parameters())


def test_the_same_model_in_a_new_layout_skips_the_gate(tmp_path, tokenizer_dir):
    """A new layout (here: no GGUF) of the published weights is a new version; the gate has
    nothing to compare (it would need the tokenize artifact, which these inputs lack)."""
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a")
    run_publish(tmp_path, "p1", a, store)
    metrics, _ = run_publish(tmp_path, "p2", a, store, gate=True, gguf=[])
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0002", True, "v0002")
    with pytest.raises(ValueError, match="tokenize"):  # another model does go through the gate
        run_publish(tmp_path, "p3", make_inputs(tmp_path, tokenizer_dir, "b", seed=1), store, gate=True)


def test_without_int8_is_another_release(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a")
    run_publish(tmp_path, "p1", a, store)
    metrics, _ = run_publish(tmp_path, "p2", a, store, include_int8=False)
    assert metrics["version"] == "v0002"
    assert not (store / "releases" / "v0002" / "model-int8.safetensors").exists()


def test_a_failed_publish_leaves_no_half_release(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    run_publish(tmp_path, "p1", make_inputs(tmp_path, tokenizer_dir, "a"), store)
    broken = make_inputs(tmp_path, tokenizer_dir, "b")
    (broken["train"] / "config.json").write_text("{not json")  # fails after the copies, before the rename
    with pytest.raises(json.JSONDecodeError):
        run_publish(tmp_path, "p2", broken, store)
    assert versions(store) == ["latest", "v0001"] and latest(store) == "v0001"
    assert not list((store / "releases").glob(".tmp-*"))


@pytest.mark.parametrize(
    "missing", ["train/model.safetensors", "evaluate/report.md", "quantize/model-int8.safetensors"]
)
def test_a_missing_file_is_named(tmp_path, tokenizer_dir, missing):
    inputs = make_inputs(tmp_path, tokenizer_dir, "a")
    stage, name = missing.split("/")
    (inputs[stage] / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        run_publish(tmp_path, "p", inputs, tmp_path / "store")


def test_publish_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        publish.PublishConfig(int8=True)


# -- the demo ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("demo")
    ctx = make_ctx(root, "publish", make_inputs(root, tokenizer_dir, "demo"), root / "store")
    publish.run(publish.PublishConfig(), ctx)
    return root / "store" / "releases"


@pytest.fixture(scope="module")
def serve():
    """Launch demos on free ports of 127.0.0.1; close them all at the end."""
    from ember.deployments.app import launch

    demos = []

    def start(releases_root: Path):
        demo = launch(releases_root, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.close()


def test_load_release(releases):
    from ember.deployments.app import load_release

    release = load_release(releases / "latest")
    assert release.version == "v0001"
    assert release.model.config.vocab_size == VOCAB
    assert release.tokenizer.token_to_id("<eos>") == 2
    assert release.report["fp32"]["bpb"] == 3.1


def test_demo_streams_generated_text(releases, serve):
    from gradio_client import Client

    demo = serve(releases)
    assert demo.local_url.startswith("http://127.0.0.1:")
    client = Client(demo.local_url, verbose=False)
    job = client.submit("To be, or not", 24, 0.0, 0, api_name="/generate")
    text = job.result(timeout=60)
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")
    assert len(job.outputs()) > 1  # streamed: one update per token, not a single answer
    # Sampling with top-k, and a prompt far longer than the model's 64-token context.
    text = client.predict("word " * 400, 8, 1.0, 5, api_name="/generate")
    assert text.startswith("word ") and len(text) > len("word " * 400)


def test_every_control_through_the_api(releases, serve):
    from gradio_client import Client

    client = Client(serve(releases).local_url, verbose=False)
    controls = dict(
        prompt="To be",
        max_new_tokens=20,
        temperature=0.9,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.3,
        seed=7,
        release="v0001",
        precision="fp32",
    )
    first = client.predict(**controls, api_name="/generate")
    assert first.startswith("To be") and len(first) > len("To be")
    assert client.predict(**controls, api_name="/generate") == first  # the seed makes it repeatable
    int8 = client.predict(**{**controls, "precision": "int8"}, api_name="/generate")
    assert int8.startswith("To be") and len(int8) > len("To be")
    assert client.predict(api_name="/release_info")["release"] == "v0001"


def test_bad_input_gets_a_message_or_a_clamped_value(releases, serve):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from ember.deployments.app import EMPTY_PROMPT, MAX_PROMPT_CHARS

    client = Client(serve(releases).local_url, verbose=False)
    for prompt in ("", "   \n"):
        with pytest.raises(AppError, match="Type a prompt first"):
            client.predict(prompt, 8, api_name="/generate")
    assert "提示词" in EMPTY_PROMPT
    huge = "ab" * 500_000 + "END"  # 1 MB: only its end is used
    text = client.predict(huge, 4, 0.0, api_name="/generate")
    assert text.startswith(huge[-MAX_PROMPT_CHARS:]) and len(text) < MAX_PROMPT_CHARS + 200
    with pytest.raises(AppError, match="greater than maximum value 512"):
        client.predict("To be", 10**9, api_name="/generate")
    for temperature in (-1, -0.5):
        with pytest.raises(AppError, match="less than minimum value"):
            client.predict("To be", 8, temperature, api_name="/generate")
    greedy = client.predict("To be", 12, 0.0, 0, api_name="/generate")
    assert greedy == client.predict("To be", 12, 0.0, 0, seed=99, api_name="/generate")  # 0 = greedy
    with pytest.raises(AppError, match="Unknown release"):
        client.predict("To be", 8, release="../../etc", api_name="/generate")
    # Nothing above left the worker stuck: a normal request is answered at once.
    job = client.submit("To be", 8, api_name="/generate")
    assert job.result(timeout=30).startswith("To be")


def test_direct_calls_are_clamped(releases):
    """Beyond the sliders' own bounds (gradio checks those), the handler clamps what it is given."""
    from ember.deployments.app import MAX_NEW_TOKENS, Releases, continue_text

    status: dict = {}
    pieces = list(
        continue_text(
            Releases(releases),
            "To be",
            max_new_tokens=10**9,
            temperature=-5,
            top_k=-3,
            top_p=7,
            repetition_penalty=0,
            seed=-20,
            status=status,
        )
    )
    assert pieces[-1].startswith("To be") and 0 < status["tokens"] <= MAX_NEW_TOKENS


def test_the_page_marks_the_prompt_apart(releases):
    """The page shows the prompt highlighted and the model's text after it, both as text: a prompt
    or an answer holding markup is shown, never rendered. (`/generate` keeps one plain string.)"""
    from ember.deployments.app import (
        MAX_PROMPT_CHARS,
        NO_RELEASE,
        Releases,
        continue_pieces,
        continue_text,
        render_output,
    )

    page = render_output("<b>To be</b> & ", "or <script>not</script>")
    assert page == (
        '<div class="ember-output"><span class="ember-prompt" title="prompt / 提示词">'
        '&lt;b&gt;To be&lt;/b&gt; &amp; </span><span class="ember-generated">'
        "or &lt;script&gt;not&lt;/script&gt;</span></div>"
    )
    assert "ember-message" in render_output(None, NO_RELEASE) and "ember-prompt" not in render_output(None, NO_RELEASE)
    assert render_output("", "") == ""

    pieces = list(continue_pieces(Releases(releases), "To be", 12, 0.0))
    assert len(pieces) > 1 and {used for used, _ in pieces} == {"To be"}  # streamed, the prompt apart
    assert pieces[-1][1] and list(continue_text(Releases(releases), "To be", 12, 0.0))[-1] == "To be" + pieces[-1][1]
    long = "ab" * MAX_PROMPT_CHARS + "END"
    with pytest.warns(UserWarning, match="only its last"):
        used, _ = next(continue_pieces(Releases(releases), long, 2, 0.0))
    assert used == long[-MAX_PROMPT_CHARS:]  # the part of a long prompt the model was given
    assert next(continue_pieces(Releases(releases.parent / "none"), "To be")) == (None, NO_RELEASE)


@pytest.fixture(scope="module")
def two_languages(tmp_path_factory, corpora) -> Path:
    return publish_two_languages(tmp_path_factory.mktemp("languages"), corpora)


def test_examples_are_in_the_model_language(two_languages):
    """Examples come from the served model's vocabulary's language: its own evaluate prompts in
    that language first, then the demo's; a prompt in another language is left out."""
    from ember.deployments.app import EXAMPLES, Releases, build_app, example_prompts
    from ember.model.scripts import model_languages, text_languages
    from ember.model.tokenizer import load_tokenizer

    assert model_languages(load_tokenizer(two_languages / "v0001")) == ["en"]
    assert model_languages(load_tokenizer(two_languages / "v0002")) == ["zh"]
    releases = Releases(two_languages)
    english, chinese = releases.examples("v0001"), releases.examples("v0002")
    assert english == ["To be", *EXAMPLES["en"]]
    assert chinese == [ZH_PROMPT, *EXAMPLES["zh"]]
    assert releases.examples("latest") == chinese and releases.examples("../x") == []
    assert {frozenset(text_languages(p)) for p in english} == {frozenset({"en"})}
    assert {frozenset(text_languages(p)) for p in chinese} == {frozenset({"zh"})}
    assert text_languages("こんにちは、世界") == {"ja"} and text_languages("1 + 1") == set()
    # A vocabulary in a script the demo has no examples for: the release's own prompts, unfiltered.
    assert example_prompts([], ["Привет", "Hi"]) == ["Привет", "Hi"]
    assert example_prompts(["ko"], ["안녕", "Hi"]) == ["안녕"]

    # The page starts with the examples of the release it serves.
    def page_examples(release: str) -> list[str]:
        config = build_app(two_languages, release).config
        (dataset,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "examples"]
        return [sample[0] for sample in dataset["props"]["samples"]]

    assert page_examples("latest") == chinese and page_examples("v0001") == english


def test_login(releases, tmp_path):
    import httpx
    from gradio_client import Client

    from ember.deployments.app import launch, parse_auth

    with pytest.raises(ValueError, match="USER:PASSWORD"):
        parse_auth("no-colon")
    demo = launch(releases, port=free_port(), prevent_thread_lock=True, auth="ember:s3cret", quiet=True)
    try:
        assert httpx.get(demo.local_url + "config").status_code == 401  # nothing without the login
        client = Client(demo.local_url, auth=("ember", "s3cret"), verbose=False)
        assert client.predict("To be", 4, 0.0, api_name="/generate").startswith("To be")
    finally:
        demo.close()


@pytest.mark.slow
def test_model_card_of_a_pipeline_release(tmp_path_factory, prefect_api):
    """The card of a release made by the real flow: data per source with its licence, what
    curation removed, training, eval, samples; pipeline.yaml is a config `ember run` accepts."""
    from ember.flows.config import load_config

    release = tiny_release_store(tmp_path_factory) / "releases" / "latest"
    card = (release / "README.md").read_text()
    for expected in (
        "## Model",
        "## Training",
        "## Evaluation",
        "## Data",
        "## Sample outputs",
        "## Provenance",
        "| shakespeare | 1 | ",
        "public domain",
        "tinyshakespeare/SOURCE.md",
        "- filter: removed ",
        "- dedup: removed ",
        "40 steps",
        f"> **{PROMPT}**",
        "| fp32 | ",
        "| int8 | ",
    ):
        assert expected in card, expected
    record = json.loads((release / "release.json").read_text())
    assert list(record["lineage"]) == [
        "download",
        "normalize",
        "filter",
        "dedup",
        "train_tokenizer",
        "tokenize",
        "train",
        "quantize",
        "evaluate",
    ]
    for stage, ref in record["lineage"].items():
        assert f"| {stage} | `{ref}` |" in card
    config = load_config(release / "pipeline.yaml")
    assert config.train.max_steps == 40 and config.download.sources[0].name == "shakespeare"
    assert yaml.safe_load((release / "pipeline.yaml").read_text())["train_tokenizer"]["vocab_size"] == VOCAB


def test_demo_without_release_says_so(tmp_path, serve):
    from gradio_client import Client

    from ember.deployments.app import NO_RELEASE

    demo = serve(tmp_path / "releases")  # does not even exist yet
    assert NO_RELEASE in json.dumps(demo.config, default=str)  # the page says it too
    client = Client(demo.local_url, verbose=False)
    answer = client.predict("hello", 8, 0.8, 50, api_name="/generate")
    assert answer == NO_RELEASE == "No release yet: run `make run` first"
    assert client.predict(api_name="/release_info") == {"release": None, "message": NO_RELEASE}
