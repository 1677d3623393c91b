"""A tiny trained release for the demo tests, built once per test session by the real flow.

Several test modules use it (the model card, gc, the browser): the first to ask builds it under
pytest's session temp folder, the others find it there, so the session trains one model.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_configs import write_config

PROMPT = "ROMEO:"


def tiny_release_store(tmp_path_factory) -> Path:
    """The store root of a session-wide tiny release (tiny Shakespeare, 40 steps). Needs a
    Prefect API (the `prefect_api` fixture) the first time."""
    import torch

    from ember.flows.config import load_config
    from ember.flows.pipeline import build_llm

    root = tmp_path_factory.getbasetemp() / "tiny-release"
    done = root / "release.txt"
    if not done.is_file():
        root.mkdir(exist_ok=True)
        config = write_config(
            root,
            train={"max_steps": 40, "eval_every": 20},
            evaluate={"prompts": [PROMPT], "max_new_tokens": 16, "eval_batches": 2, "batch_size": 8, "speed_tokens": 8},
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model gains nothing from a second thread (see conftest)
        try:
            summary = build_llm(load_config(config), store_root=str(root / "store"))
        finally:
            torch.set_num_threads(threads)
        assert summary["release"], summary
        done.write_text(summary["release"])
    return root / "store"
