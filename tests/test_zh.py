"""configs/zh.yaml publishes a model whose demo answers a Chinese prompt in Chinese.

The test runs a reduced copy of that config through the real flow (a slice of each corpus, the
tiny model, 200 steps), so it keeps zh.yaml's sources and curation settings and takes about a
minute; the full config trains for a few minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ZH = Path(__file__).resolve().parents[1] / "configs" / "zh.yaml"
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")  # CJK ideographs
CJK_PUNCTUATION = re.compile(r"[\u3000-\u303f\uff00-\uffef\u2018\u2019\u201c\u201d\u2026\u2014]")
PROMPT = "话说天下大势，"


def reduced_zh_config(folder: Path) -> Path:
    config = yaml.safe_load(ZH.read_text())
    for source in config["download"]["sources"]:
        source["path"] = str((ZH.parent / source["path"]).resolve())
        source["max_docs"] = 40 if source["name"] == "novels" else 4000  # about 150k + 350k characters
    config["train_tokenizer"] = {"vocab_size": 2048}
    config["train"] = {
        "model": {"preset": "tiny"},
        "batch_size": 8,
        "max_steps": 200,
        "warmup_steps": 10,
        "lr": 0.004,
        "eval_every": 100,
        "eval_batches": 1,
        "checkpoint_every": 100,
    }
    config["evaluate"] = {"eval_batches": 1, "prompts": [PROMPT], "max_new_tokens": 8, "speed_tokens": 0}
    config["publish"] = {**config["publish"], "gguf": []}
    path = folder / "zh-small.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return path


def test_the_full_config_is_valid():
    from ember.flows.config import load_config
    from ember.tasks.download import preflight

    config = load_config(ZH)
    preflight(config.download)  # both corpora are there and hold text
    assert [s.name for s in config.download.sources] == ["novels", "poetry"]
    assert config.train.model.preset == "cpu" and config.train_tokenizer.vocab_size == 8192


def test_a_chinese_model_answers_in_chinese(tmp_path, prefect_api, one_torch_thread):
    from gradio_client import Client

    from ember.deployments.app import launch
    from ember.flows.config import load_config
    from ember.flows.pipeline import build_llm

    summary = build_llm(load_config(reduced_zh_config(tmp_path)), store_root=str(tmp_path / "store"))
    release = Path(summary["release"])
    card = (release / "README.md").read_text()
    assert "| novels | 40 |" in card and "| poetry | 4,000 |" in card and "MIT" in card

    demo = launch(tmp_path / "store" / "releases", port=None, prevent_thread_lock=True, quiet=True)
    try:
        answer = Client(demo.local_url, verbose=False).predict(PROMPT, 40, 0.7, 40, seed=1, api_name="/generate")
    finally:
        demo.close()
    assert answer.startswith(PROMPT)
    new = "".join(answer[len(PROMPT) :].split())
    han, punctuation = len(HAN.findall(new)), len(CJK_PUNCTUATION.findall(new))
    # Mostly Chinese characters, and nothing but Chinese text (characters and full-width punctuation).
    assert len(new) >= 10 and han / len(new) >= 0.5 and (han + punctuation) / len(new) >= 0.9, answer
