"""The releases the demo serves: loaded from a releases folder, kept in memory (a few, the least
recently used dropped), and a prompt continued token by token. No page here: deployments/app.py
is the Gradio page over this. Gradio's own messages are used: `gr.Error` for what the user must
change (shown on the page; gradio_client raises it as an AppError) and `gr.Warning` for a prompt
cut to its end (a toast; a UserWarning outside a request).

Names from the browser are checked (`latest` or `vNNNN` only), and every control's value is
clamped to a range, whatever an API call sends.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no look-ups
import gradio as gr  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from ember.model.checkpoint import load_model  # noqa: E402
from ember.model.decoding import use_decoding_layout  # noqa: E402
from ember.model.generate import generate  # noqa: E402
from ember.model.quantize import INT8_WEIGHTS, load_int8  # noqa: E402
from ember.model.scripts import model_languages, text_languages  # noqa: E402
from ember.model.tokenizer import EOS_ID, load_tokenizer  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402
from ember.storage.releases import CARD, LATEST, VERSION_RE, current_version, list_versions  # noqa: E402

NO_RELEASE = "No release yet: run `make run` first"
MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 8_000  # the prompt is cut to the model's context in tokens anyway
MAX_SECONDS = 120  # one generation never holds the queue longer than this
PRECISIONS = ("fp32", "int8")
LOADED_KEEP = 2  # models kept in memory (release x precision)
# The controls' starting values, for the page and for API calls that leave a control out.
DEFAULTS = dict(max_new_tokens=128, temperature=0.8, top_k=50, top_p=1.0, repetition_penalty=1.1, seed=-1)
# Example prompts per language, after the release's own evaluate prompts that fit its language.
EXAMPLES = {
    "en": ["Once upon a time", "ROMEO:", "It was a dark and stormy night", "The king said"],
    "zh": ["话说天下大势，分久必合，", "床前明月光，", "却说宝玉", "春眠不觉晓，"],
}
MAX_EXAMPLES = 8
EMPTY_PROMPT = "请输入提示词。 / Type a prompt first."


def example_prompts(languages: list[str], release_prompts: list[str], limit: int = MAX_EXAMPLES) -> list[str]:
    """The release's own prompts (its evaluate stage's) written in its languages, then the
    demo's examples for those languages. With no language known, the release's prompts as they are."""
    if not languages:
        return list(dict.fromkeys(release_prompts))[:limit]
    fitting = [p for p in release_prompts if text_languages(p) and text_languages(p) <= set(languages)]
    return list(dict.fromkeys(fitting + [p for lang in languages for p in EXAMPLES.get(lang, [])]))[:limit]


@dataclass
class Release:
    path: Path
    model: Transformer  # fp32 or int8
    tokenizer: Tokenizer
    config: dict[str, Any]  # config.json: model, tokenizer ids, training summary
    report: dict[str, Any] = field(default_factory=dict)  # report.json of the evaluate stage
    info: dict[str, Any] = field(default_factory=dict)  # release.json: version, refs, metrics
    precision: str = "fp32"

    @property
    def version(self) -> str:
        version: str = self.info.get("version", self.path.name)
        return version

    @property
    def eos_id(self) -> int:
        return int(self.config.get("tokenizer", {}).get("eos_id", EOS_ID))


def read_json(path: Path) -> dict[str, Any]:
    """A release's JSON file ({} when there is none)."""
    found: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return found


def load_release(release_dir: Path | str, precision: str = "fp32") -> Release:
    """The model (fp32 or int8), tokenizer and reports of one release folder."""
    path = Path(release_dir).resolve()
    if precision == "int8":
        if not (path / INT8_WEIGHTS).is_file():
            raise gr.Error(
                f"Release {path.name} has no int8 model (published with include_int8: false); "
                f"choose fp32. / 该版本没有 int8 模型，请选择 fp32。"
            )
        model = load_int8(path)
    else:
        model = load_model(path)
    use_decoding_layout(model)  # about 1.5x faster decoding on CPU (see its docstring)
    return Release(
        path=path,
        model=model,
        tokenizer=load_tokenizer(path),
        config=read_json(path / "config.json"),
        report=read_json(path / "report.json"),
        info=read_json(path / "release.json"),
        precision=precision,
    )


class Releases:
    """The releases under one folder, and the models loaded from them (a few, least recently used
    dropped). Names come from the browser, so only `latest` and `vNNNN` are accepted."""

    def __init__(self, root: Path | str, default: str = LATEST):
        self.root = Path(root)
        self.default = default
        self._loaded: OrderedDict[tuple[Path, str], Release] = OrderedDict()
        self._examples: dict[Path, list[str]] = {}  # a release never changes, so neither do its examples
        self._lock = threading.Lock()

    def folder(self, name: str | None) -> Path | None:
        """The release folder `name` serves now (`latest` resolved), or None when there is none."""
        name = name or self.default
        if name != LATEST and not VERSION_RE.match(name):
            raise gr.Error(f"Unknown release {name!r}: choose latest or a version such as v0001.")
        path = self.root / name
        return path.resolve() if (path / "model.safetensors").is_file() else None

    def get(self, name: str | None, precision: str = "fp32") -> Release | None:
        if precision not in PRECISIONS:
            raise gr.Error(f"Unknown weights {precision!r}: choose {' or '.join(PRECISIONS)}.")
        folder = self.folder(name)
        if folder is None:
            return None
        with self._lock:  # two sessions asking for the same model load it once
            key = (folder, precision)
            if key not in self._loaded:
                self._loaded[key] = load_release(folder, precision)
                while len(self._loaded) > LOADED_KEEP:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

    def choices(self) -> list[tuple[str, str]]:
        """(label, value) for the release dropdown: latest first, then the versions, newest first."""
        versions = list_versions(self.root)
        current = current_version(self.root)
        latest = f"latest ({current})" if current and current in versions else "latest"
        return [(latest, LATEST)] + [(v, v) for v in reversed(versions)]

    def examples(self, name: str | None) -> list[str]:
        """Example prompts in the language of the model `name` serves now ([] without one)."""
        try:
            folder = self.folder(name)
        except gr.Error:
            return []
        if folder is None:
            return []
        with self._lock:
            if folder not in self._examples:
                report = read_json(folder / "report.json")
                prompts = [s["prompt"] for s in report.get("samples", {}).get("fp32", []) if s.get("prompt")]
                self._examples[folder] = example_prompts(model_languages(load_tokenizer(folder)), prompts)
            return self._examples[folder]

    def card(self, name: str | None) -> str:
        try:
            folder = self.folder(name)
        except gr.Error as err:
            return str(err)
        if folder is None:
            return f"**{NO_RELEASE}**"
        if (folder / CARD).is_file():
            return (folder / CARD).read_text(encoding="utf-8")
        info = read_json(folder / "release.json")  # a release published before model cards
        return (
            f"# Ember model {info.get('version', folder.name)}\n\nPublished {info.get('created', '?')}; no model card."
        )


# -- generation ------------------------------------------------------------------------------------


def _bounded(value: float | str, name: str, low: float, high: float) -> float:
    """A control's value clamped to its range; a missing or non-numeric one is a clear error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise gr.Error(f"{name} must be a finite number, got {value!r}.")
    return min(max(number, low), high)


def continue_text(
    releases: Releases,
    prompt: str,
    max_new_tokens: float = DEFAULTS["max_new_tokens"],
    temperature: float = DEFAULTS["temperature"],
    top_k: float = DEFAULTS["top_k"],
    top_p: float = DEFAULTS["top_p"],
    repetition_penalty: float = DEFAULTS["repetition_penalty"],
    seed: float = DEFAULTS["seed"],
    release: str = LATEST,
    precision: str = "fp32",
    status: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Yields the prompt plus the text generated so far, growing token by token.

    Out-of-range values are clamped (a temperature of 0 or below is greedy decoding); `status`,
    when given, is filled with what was served (version, weights, tokens, seconds).
    """
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
        yield generated if used is None else used + generated


def continue_pieces(
    releases: Releases,
    prompt: str,
    max_new_tokens: float = DEFAULTS["max_new_tokens"],
    temperature: float = DEFAULTS["temperature"],
    top_k: float = DEFAULTS["top_k"],
    top_p: float = DEFAULTS["top_p"],
    repetition_penalty: float = DEFAULTS["repetition_penalty"],
    seed: float = DEFAULTS["seed"],
    release: str = LATEST,
    precision: str = "fp32",
    status: dict[str, Any] | None = None,
) -> Iterator[tuple[str | None, str]]:
    """`continue_text` in two parts: (the prompt used, the text generated so far). The prompt
    used is the end of a prompt that was too long; before any release it is None and the text
    says so."""
    loaded = releases.get(release, precision)
    if loaded is None:
        yield None, NO_RELEASE
        return
    prompt = "" if prompt is None else str(prompt)
    if not prompt.strip():
        raise gr.Error(EMPTY_PROMPT)
    if len(prompt) > MAX_PROMPT_CHARS:
        gr.Warning(
            f"提示词过长，只保留最后 {MAX_PROMPT_CHARS:,} 个字符。 / The prompt has {len(prompt):,} "
            f"characters; only its last {MAX_PROMPT_CHARS:,} are used."
        )
        prompt = prompt[-MAX_PROMPT_CHARS:]
    max_new = int(_bounded(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS))
    temperature = _bounded(temperature, "temperature", 0.0, 2.0)
    top_k = int(_bounded(top_k, "top-k", 0, 1_000_000))
    top_p = _bounded(top_p, "top-p", 0.0, 1.0)
    penalty = _bounded(repetition_penalty, "repetition penalty", 1.0, 2.0)
    seed = int(_bounded(seed, "seed", -1, 2**63 - 1))

    context = loaded.model.config.max_seq_len
    # Training documents start right after an EOS, so one in front makes the prompt a document
    # start. Keep the end of a long prompt: that is what the model continues.
    ids = [loaded.eos_id] + loaded.tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = ids[-max(1, context - 1) :]
    started = time.monotonic()
    new: list[int] = []
    text = ""
    for token in generate(
        loaded.model,
        ids,
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p if 0 < top_p < 1 else None,
        eos_id=loaded.eos_id,
        seed=None if seed < 0 else seed,
        repetition_penalty=penalty,
    ):
        new.append(token)
        piece = loaded.tokenizer.decode(new)
        if not piece.endswith("\ufffd"):  # else half of a multi-byte character: wait for the rest
            text = piece
            yield prompt, text
        if time.monotonic() - started > MAX_SECONDS:
            break
    # A last token that ends inside a character (cut by max_new_tokens) shows nothing of it.
    final = loaded.tokenizer.decode(new).rstrip("\ufffd")
    if status is not None:
        status.update(
            version=loaded.version, precision=loaded.precision, tokens=len(new), seconds=time.monotonic() - started
        )
    if final != text or not new:
        yield prompt, final
