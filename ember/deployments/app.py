"""The Gradio demo: type a prompt and watch the published model continue it, token by token.

It serves `<releases_root>/latest` (or a named version), binds 127.0.0.1 and never shares
unless asked, and runs one generation at a time so a 2-core machine stays usable. Before any
release exists it still starts and says so. When `latest` moves to a new release, the next
generation loads it: a scheduled retrain shows up without restarting the demo.

    ember demo [--release v0001] [--host 127.0.0.1] [--port 7860]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no look-ups
import gradio as gr  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from ember.model.checkpoint import load_model  # noqa: E402
from ember.model.generate import generate  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402
from ember.tasks.train_tokenizer import EOS_ID, load_tokenizer  # noqa: E402

NO_RELEASE = "No release yet: run `make run` first"
MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 8_000  # the prompt is cut to the model's context in tokens anyway


@dataclass
class Release:
    path: Path
    model: Transformer
    tokenizer: Tokenizer
    config: dict  # config.json: model, tokenizer ids, training summary
    report: dict = field(default_factory=dict)  # report.json of the evaluate stage
    info: dict = field(default_factory=dict)  # release.json: version, refs, metrics

    @property
    def version(self) -> str:
        return self.info.get("version", self.path.name)

    @property
    def eos_id(self) -> int:
        return int(self.config.get("tokenizer", {}).get("eos_id", EOS_ID))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_release(release_dir: Path | str) -> Release:
    """The model (fp32), tokenizer and reports of one release folder."""
    path = Path(release_dir).resolve()
    return Release(path=path, model=load_model(path), tokenizer=load_tokenizer(path),
                   config=_read_json(path / "config.json"), report=_read_json(path / "report.json"),
                   info=_read_json(path / "release.json"))


class _ReleaseSlot:
    """The release the demo serves: loaded on first use, reloaded when `latest` points elsewhere."""

    def __init__(self, releases_root: Path, name: str):
        self.link = Path(releases_root) / name
        self.release: Release | None = None

    def get(self) -> Release | None:
        if not (self.link / "model.safetensors").is_file():
            return None
        target = self.link.resolve()
        if self.release is None or self.release.path != target:
            self.release = load_release(target)
        return self.release


def _header(release: Release | None) -> str:
    if release is None:
        return f"## Ember\n\n**{NO_RELEASE}**"
    model = release.config.get("model", {})
    info = release.info
    shape = ", ".join(f"{k} {model[k]}" for k in ("dim", "n_layers", "n_heads", "max_seq_len") if k in model)
    created = f"Created {info['created']}. " if "created" in info else ""
    return f"## Ember: release {release.version}\n\n{created}" + (f"Model: {shape}." if shape else "")


def continue_text(slot: _ReleaseSlot, prompt: str, max_new_tokens: float, temperature: float,
                  top_k: float) -> Iterator[str]:
    """The handler: yields the prompt plus the text generated so far, growing token by token."""
    release = slot.get()
    if release is None:
        yield NO_RELEASE
        return
    prompt = (prompt or "")[:MAX_PROMPT_CHARS]
    context = release.model.config.max_seq_len
    # Training documents start right after an EOS, so one in front makes the prompt a document
    # start (and gives an empty prompt something to continue). Keep the end of a long prompt.
    ids = [release.eos_id] + release.tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = ids[-max(1, context - 1):]
    new: list[int] = []
    for token in generate(release.model, ids, max_new_tokens=max(1, min(int(max_new_tokens), MAX_NEW_TOKENS)),
                          temperature=max(0.0, float(temperature)), top_k=int(top_k) or None,
                          eos_id=release.eos_id):
        new.append(token)
        piece = release.tokenizer.decode(new)
        if not piece.endswith("\ufffd"):  # else half of a multi-byte character: wait for the rest
            yield prompt + piece
    yield prompt + release.tokenizer.decode(new)


def build_app(releases_root: Path | str, release: str = "latest") -> gr.Blocks:
    """The demo's Blocks, queued one generation at a time; `launch()` or mount it."""
    slot = _ReleaseSlot(Path(releases_root), release)
    current = slot.get()

    def handler(prompt: str, max_new_tokens: float, temperature: float, top_k: float) -> Iterator[str]:
        yield from continue_text(slot, prompt, max_new_tokens, temperature, top_k)

    with gr.Blocks(title="Ember demo") as demo:
        gr.Markdown(_header(current))
        prompt = gr.Textbox(label="提示词 / Prompt", lines=4, max_length=MAX_PROMPT_CHARS,
                            placeholder="Once upon a time")
        with gr.Row():
            max_new = gr.Slider(1, MAX_NEW_TOKENS, value=128, step=1, label="最大长度 / Max length")
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="温度 / Temperature",
                                    info="0 = greedy")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-K", info="0 = off")
        button = gr.Button("Generate", variant="primary")
        output = gr.Textbox(label="输出 / Output", lines=12, interactive=False)
        if current is not None and (current.path / "report.md").is_file():
            with gr.Accordion("Evaluation report", open=False):
                gr.Markdown((current.path / "report.md").read_text())
        button.click(handler, inputs=[prompt, max_new, temperature, top_k], outputs=output, api_name="generate")
    return demo.queue(default_concurrency_limit=1)


def launch(releases_root: Path | str, release: str = "latest", host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, prevent_thread_lock: bool = False) -> gr.Blocks:
    """Serve the demo (blocking unless `prevent_thread_lock`); returns the Blocks, to `close()` it."""
    demo = build_app(releases_root, release)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                inbrowser=False, show_error=True)
    return demo
