"""The Gradio demo: type a prompt and watch a published model continue it, token by token.

It serves `<releases_root>/latest` (or a chosen version, in fp32 or int8), with the release's
model card beside it. Labels are in English or Chinese (the seed's own: 提示词, 最大长度, 温度,
Top-K), chosen by the browser's language and switched by a toggle. It binds 127.0.0.1, never
shares unless asked, can require a login (`--auth user:pass` or $EMBER_DEMO_AUTH), caps the
prompt and the number of new tokens, and queues requests (one generation at a time by default)
so a 2-core machine stays usable. Before any release exists it still starts and says so. When
`latest` moves (a new release, a rollback), the next generation uses it without a restart.

    ember demo [--release v0001] [--host 127.0.0.1] [--port 7860] [--auth user:pass]

The page shows the prompt highlighted and the model's text after it, offers example prompts
in the language of the served model (told by its tokenizer's vocabulary, see
`ember.model.scripts.model_languages`), and renders the card's tables to fit the narrow column (`DEMO_CSS`, which
`launch` passes to Gradio; pass it too when mounting the Blocks elsewhere). Loading releases
and generating from them is deployments/releases_served.py; this module is the page.

API (gradio_client): `/generate` (prompt, max_new_tokens, temperature, top_k, top_p,
repetition_penalty, seed, release, precision) streams the prompt plus the text so far, as one
string; `/release_info` (release) returns what that choice serves now.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no look-ups
import gradio as gr  # noqa: E402
from gradio.events import api  # noqa: E402  (`gr.api`, which gradio leaves out of its __all__)

from ember.deployments.releases_served import (  # noqa: E402
    DEFAULTS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_SECONDS,
    NO_RELEASE,
    PRECISIONS,
    Releases,
    continue_pieces,
    continue_text,
    read_json,
)
from ember.storage.releases import LATEST, current_version  # noqa: E402
from ember.storage.store import Store  # noqa: E402

AUTH_ENV = "EMBER_DEMO_AUTH"

# Every label in both languages; the Chinese ones of the seed's four controls are the seed's own.
TEXT = {
    "en": {
        "intro": "## Ember\n\nA small language model trained from scratch by Ember. Type the start of a text "
        "and it writes on.",
        "prompt": "Prompt",
        "prompt_hint": "Once upon a time",
        "max_new": "Max new tokens",
        "temperature": "Temperature",
        "temperature_info": "0 = greedy (always the likeliest token)",
        "top_k": "Top-K",
        "top_k_info": "0 = off",
        "advanced": "Advanced",
        "top_p": "Top-P",
        "top_p_info": "1 = off",
        "repetition_penalty": "Repetition penalty",
        "repetition_penalty_info": "1 = off; above 1 discourages repeating tokens",
        "seed": "Seed",
        "seed_info": "-1 = random; the same seed and settings give the same text",
        "release": "Release",
        "precision": "Weights",
        "generate": "Generate",
        "stop": "Stop",
        "output": "Output: your prompt highlighted, then what the model wrote",
        "examples": "Examples",
        "card": "### Model card",
    },
    "zh": {
        "intro": "## Ember\n\n由 Ember 从零训练的小型语言模型。输入一段文字的开头，它会接着写下去。",
        "prompt": "提示词",
        "prompt_hint": "话说天下大势，",
        "max_new": "最大长度",
        "temperature": "温度",
        "temperature_info": "0 = 贪心解码（总选最可能的词元）",
        "top_k": "Top-K",
        "top_k_info": "0 = 不限",
        "advanced": "高级选项",
        "top_p": "Top-P",
        "top_p_info": "1 = 不限",
        "repetition_penalty": "重复惩罚",
        "repetition_penalty_info": "1 = 不惩罚；大于 1 时减少重复",
        "seed": "随机种子",
        "seed_info": "-1 = 随机；相同的种子和设置生成相同的文字",
        "release": "版本",
        "precision": "权重精度",
        "generate": "生成",
        "stop": "停止",
        "output": "输出：高亮的是提示词，其后是模型写的",
        "examples": "示例",
        "card": "### 模型卡片",
    },
}
LANGUAGES = {"English": "en", "中文": "zh"}
# Runs in the browser on page load: the toggle starts at the browser's language.
BROWSER_LANGUAGE_JS = "() => ((navigator.language || '').toLowerCase().startsWith('zh') ? '中文' : 'English')"

# The prompt is shown highlighted, the model's text plain after it, so a reader sees at a glance
# where the model took over. The card's tables get a smaller font and wrap only between words:
# the right column is about 480 px wide, and Gradio's default breaks headers mid-word
# ("perple|xity") while a 64-digit store key in a table pushes the column sideways. A table
# still too wide (a card from before CARD_FORMAT 2, a narrow window) scrolls inside itself, as
# GitHub shows tables, rather than widening the card.
DEMO_CSS = """
#output .ember-output { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.6; font-size: var(--text-lg); }
#output .ember-prompt { background: var(--color-accent-soft); border-bottom: 2px solid var(--color-accent);
  font-weight: 600; border-radius: 3px; -webkit-box-decoration-break: clone; box-decoration-break: clone; }
#output .ember-message { color: var(--body-text-color-subdued); }
#card table { display: block; width: max-content; max-width: 100%; overflow-x: auto; font-size: var(--text-sm);
  border: none; padding: 0; }
#card th, #card td { padding: 4px 6px; word-break: normal; overflow-wrap: normal; hyphens: none; }
#card th { vertical-align: bottom; }
#card td code { word-break: break-all; font-size: 0.9em; }
#card pre, #card pre code { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def render_output(prompt: str | None, generated: str) -> str:
    """The output box's HTML: the prompt highlighted, then the generated text, both escaped
    (the prompt is a stranger's text and the model writes anything). A None prompt marks
    `generated` as a message (no release yet) rather than model text."""
    if prompt is None:
        return f'<div class="ember-output ember-message">{html.escape(generated)}</div>'
    if not prompt and not generated:
        return ""
    return (
        f'<div class="ember-output"><span class="ember-prompt" title="prompt / 提示词">{html.escape(prompt)}'
        f'</span><span class="ember-generated">{html.escape(generated)}</span></div>'
    )


def _status_line(status: dict[str, Any] | None) -> str:
    if not status:
        return ""
    rate = status["tokens"] / status["seconds"] if status["seconds"] > 0 else 0.0
    return (
        f"{status['version']} · {status['precision']} · {status['tokens']} tokens · "
        f"{status['seconds']:.1f} s ({rate:.0f} tokens/s)"
    )


# -- the app ---------------------------------------------------------------------------------------


def build_app(releases_root: Path | str, release: str = LATEST, concurrency: int = 1, max_queue: int = 32) -> gr.Blocks:
    """The demo's Blocks, queued `concurrency` generations at a time; `launch()` or mount it
    (with `css=DEMO_CSS`)."""
    releases = Releases(releases_root, release)
    if releases.folder(release):
        releases.get(release)  # load now: the first answer is quick
    en = TEXT["en"]

    def show(
        prompt: str,
        max_new_tokens: float = DEFAULTS["max_new_tokens"],
        temperature: float = DEFAULTS["temperature"],
        top_k: float = DEFAULTS["top_k"],
        top_p: float = DEFAULTS["top_p"],
        repetition_penalty: float = DEFAULTS["repetition_penalty"],
        seed: float = DEFAULTS["seed"],
        release: str = release,
        precision: str = "fp32",
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        status: dict[str, Any] = {}
        for used, generated in continue_pieces(
            releases,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            release,
            precision,
            status,
        ):
            yield render_output(used, generated), status

    def handler(
        prompt: str,
        max_new_tokens: float = DEFAULTS["max_new_tokens"],
        temperature: float = DEFAULTS["temperature"],
        top_k: float = DEFAULTS["top_k"],
        top_p: float = DEFAULTS["top_p"],
        repetition_penalty: float = DEFAULTS["repetition_penalty"],
        seed: float = DEFAULTS["seed"],
        release: str = release,
        precision: str = "fp32",
    ) -> Iterator[str]:
        yield from continue_text(
            releases, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, release, precision
        )

    def release_info(release: str = release) -> dict[str, str | None]:
        folder = releases.folder(release)
        if folder is None:
            return {"release": None, "message": NO_RELEASE}
        info = read_json(folder / "release.json")
        return {
            "release": info.get("version", folder.name),
            "created": info.get("created"),
            "folder": str(folder),
            "latest": current_version(releases.root),
        }

    def examples_update(name: str | None) -> dict[str, Any]:
        samples = releases.examples(name)
        return gr.update(samples=[[p] for p in samples], visible=bool(samples))

    examples = releases.examples(release)
    demo = gr.Blocks(title="Ember demo")  # typed here: `with ... as` gives gradio's untyped __enter__
    with demo:
        with gr.Row():
            intro = gr.Markdown(en["intro"])
            language = gr.Radio(list(LANGUAGES), value="English", label="Language / 语言", scale=0, min_width=200)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label=en["prompt"],
                    lines=4,
                    max_length=MAX_PROMPT_CHARS,
                    placeholder=en["prompt_hint"],
                    elem_id="prompt",
                )
                with gr.Row():
                    max_new = gr.Slider(
                        1, MAX_NEW_TOKENS, value=DEFAULTS["max_new_tokens"], step=1, label=en["max_new"]
                    )
                    temperature = gr.Slider(
                        0.0,
                        2.0,
                        value=DEFAULTS["temperature"],
                        step=0.05,
                        label=en["temperature"],
                        info=en["temperature_info"],
                    )
                    top_k = gr.Slider(0, 200, value=DEFAULTS["top_k"], step=1, label=en["top_k"], info=en["top_k_info"])
                with gr.Accordion(en["advanced"], open=False) as advanced:
                    with gr.Row():
                        top_p = gr.Slider(
                            0.05, 1.0, value=DEFAULTS["top_p"], step=0.05, label=en["top_p"], info=en["top_p_info"]
                        )
                        penalty = gr.Slider(
                            1.0,
                            2.0,
                            value=DEFAULTS["repetition_penalty"],
                            step=0.05,
                            label=en["repetition_penalty"],
                            info=en["repetition_penalty_info"],
                        )
                        seed = gr.Number(
                            value=DEFAULTS["seed"], precision=0, minimum=-1, label=en["seed"], info=en["seed_info"]
                        )
                    with gr.Row():
                        # Versions published after start are valid too (checked in Releases.folder).
                        choice = gr.Dropdown(
                            releases.choices(), value=release, label=en["release"], allow_custom_value=True
                        )
                        precision = gr.Radio(list(PRECISIONS), value="fp32", label=en["precision"])
                with gr.Row():
                    button = gr.Button(en["generate"], variant="primary", elem_id="generate")
                    stop = gr.Button(en["stop"], variant="secondary")
                output = gr.HTML(
                    render_output("", ""),
                    label=en["output"],
                    show_label=True,
                    container=True,
                    padding=True,
                    min_height=280,
                    max_height=560,
                    autoscroll=True,
                    elem_id="output",
                )
                # What `/generate` answers: the same text as one plain string, for scripts.
                api_output = gr.Textbox(visible=False)
                status_line = gr.Markdown("", elem_id="status")
                status = gr.State({})
                sample_prompts = gr.Dataset(
                    components=[prompt],
                    samples=[[p] for p in examples],
                    type="values",
                    label=en["examples"],
                    visible=bool(examples),
                    elem_id="examples",
                )
            with gr.Column(scale=2):
                card_title = gr.Markdown(en["card"])
                card = gr.Markdown(releases.card(release), max_height=720, elem_id="card")

        controls = [prompt, max_new, temperature, top_k, top_p, penalty, seed, choice, precision]
        # Two endpoints sharing one concurrency group: the page streams highlighted HTML, while
        # `/generate` (no trigger on the page) keeps its plain string and the controls' range
        # checks, so gradio_client scripts see no change.
        event = button.click(
            show,
            inputs=controls,
            outputs=[output, status],
            api_visibility="private",
            concurrency_id="generate",
            # gradio's generated stub of Button.click (button.pyi) leaves out time_limit, which the
            # event listener takes (gradio/events.py) and the queue enforces on a generator.
            time_limit=MAX_SECONDS + 30,  # type: ignore[call-arg]
        )
        event.then(_status_line, inputs=status, outputs=status_line, api_visibility="private")
        stop.click(None, cancels=[event])
        gr.on(
            [],
            handler,
            inputs=controls,
            outputs=api_output,
            api_name="generate",
            concurrency_id="generate",
            time_limit=MAX_SECONDS + 30,
        )
        sample_prompts.click(
            lambda sample: sample[0], inputs=sample_prompts, outputs=prompt, api_visibility="private", queue=False
        )
        choice.change(
            lambda name: (releases.card(name), examples_update(name)),
            inputs=choice,
            outputs=[card, sample_prompts],
            api_visibility="private",
        )

        labelled = [
            intro,
            prompt,
            max_new,
            temperature,
            top_k,
            advanced,
            top_p,
            penalty,
            seed,
            choice,
            precision,
            button,
            stop,
            output,
            sample_prompts,
            card_title,
        ]

        def relabel(name: str) -> list[dict[str, Any]]:
            t = TEXT[LANGUAGES.get(name, "en")]
            return [
                gr.update(value=t["intro"]),
                gr.update(label=t["prompt"], placeholder=t["prompt_hint"]),
                gr.update(label=t["max_new"]),
                gr.update(label=t["temperature"], info=t["temperature_info"]),
                gr.update(label=t["top_k"], info=t["top_k_info"]),
                gr.update(label=t["advanced"]),
                gr.update(label=t["top_p"], info=t["top_p_info"]),
                gr.update(label=t["repetition_penalty"], info=t["repetition_penalty_info"]),
                gr.update(label=t["seed"], info=t["seed_info"]),
                gr.update(label=t["release"]),
                gr.update(label=t["precision"]),
                gr.update(value=t["generate"]),
                gr.update(value=t["stop"]),
                gr.update(label=t["output"]),
                gr.update(label=t["examples"]),
                gr.update(value=t["card"]),
            ]

        language.change(relabel, inputs=language, outputs=labelled, api_visibility="private", queue=False)
        # On page load: the browser's language, and the releases published since the app started.
        demo.load(
            lambda name: name,
            inputs=language,
            outputs=language,
            js=BROWSER_LANGUAGE_JS,
            api_visibility="private",
            queue=False,
        )

        def refresh(name: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
            names = [value for _, value in releases.choices()]
            return (
                gr.update(choices=releases.choices(), value=name if name in names else LATEST),
                releases.card(name),
                examples_update(name),
            )

        demo.load(refresh, inputs=choice, outputs=[choice, card, sample_prompts], api_visibility="private", queue=False)
        api(release_info, api_name="release_info")
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)  # returns `demo` (untyped)
    return demo


def parse_auth(value: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """`user:pass` (or a pair) -> (user, pass); None or "" -> no login."""
    if not value:
        return None
    if isinstance(value, (tuple, list)):
        user, password = value
    else:
        user, sep, password = str(value).partition(":")
        if not sep:
            raise ValueError(f"auth must be USER:PASSWORD, got {value!r} (no ':')")
    if not user or not password:
        raise ValueError("auth needs both a user name and a password (USER:PASSWORD)")
    return str(user), str(password)


def launch(
    releases_root: Path | str | Store,
    release: str = LATEST,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    prevent_thread_lock: bool = False,
    auth: str | tuple[str, str] | None = None,
    concurrency: int = 1,
    quiet: bool = False,
) -> gr.Blocks:
    """Serve the demo (blocking unless `prevent_thread_lock`); returns the Blocks, to `close()` it.

    `releases_root` is a releases folder or a Store (its `releases_dir`). `auth` is USER:PASSWORD
    or a pair; by default $EMBER_DEMO_AUTH, else no login. `port=None` picks a free one.
    """
    root = releases_root.releases_dir if isinstance(releases_root, Store) else releases_root
    credentials = parse_auth(auth if auth is not None else os.environ.get(AUTH_ENV))
    demo = build_app(root, release, concurrency=concurrency)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        inbrowser=False,
        show_error=True,
        auth=credentials,
        quiet=quiet,
        css=DEMO_CSS,
        auth_message="Ember demo: log in / 请登录" if credentials else None,
    )
    return demo
