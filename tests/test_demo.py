"""The Gradio demo over a real server: every control through gradio_client, bad input, the page's
prompt and examples, login, and no release yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest

from ember.tasks import publish
from release_builders import VOCAB, ZH_PROMPT, free_port, make_ctx, make_inputs, publish_two_languages


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
    from ember.deployments.releases_served import load_release

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

    from ember.deployments.releases_served import EMPTY_PROMPT, MAX_PROMPT_CHARS

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
    from ember.deployments.releases_served import MAX_NEW_TOKENS, Releases, continue_text

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
    from ember.deployments.app import render_output
    from ember.deployments.releases_served import MAX_PROMPT_CHARS, NO_RELEASE, Releases, continue_pieces, continue_text

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
    from ember.deployments.app import build_app
    from ember.deployments.releases_served import EXAMPLES, Releases, example_prompts
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
    url = cast(str, demo.local_url)  # gradio declares it None; launch() sets it
    try:
        assert httpx.get(url + "config").status_code == 401  # nothing without the login
        client = Client(url, auth=("ember", "s3cret"), verbose=False)
        assert client.predict("To be", 4, 0.0, api_name="/generate").startswith("To be")
    finally:
        demo.close()


def test_demo_without_release_says_so(tmp_path, serve):
    from gradio_client import Client

    from ember.deployments.releases_served import NO_RELEASE

    demo = serve(tmp_path / "releases")  # does not even exist yet
    assert NO_RELEASE in json.dumps(demo.config, default=str)  # the page says it too
    client = Client(demo.local_url, verbose=False)
    answer = client.predict("hello", 8, 0.8, 50, api_name="/generate")
    assert answer == NO_RELEASE == "No release yet: run `make run` first"
    assert client.predict(api_name="/release_info") == {"release": None, "message": NO_RELEASE}
