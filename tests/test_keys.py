"""Store keys do not move by accident: a refactor that changes no stage's logic keeps every cached
artifact. When a stage's output does change, bump its version and update its key here."""

from __future__ import annotations

from ember.flows.config import PipelineConfig
from ember.storage.store import compute_key
from ember.tasks.stages import STAGES

# Each stage's key for its default section (download: one path source) and no inputs, as
# computed before the layout moved to top-level folders (commit e0d7160).
KEYS = {
    "download": "f7acd6813aeb36d31e4920c9ef9421f27bfe61485a7a4e65e8463130d697a087",
    "normalize": "f58915d5a38f888317641479f33ad0778c025016bd7eb28b79617ca63184cd8e",
    "filter": "e459707e574f3785de4f70c7c3a6cc013437ba008a09b33865b734702d5189b7",
    "dedup": "a11cb491d23b010adf6ff272ae934353097d820b7c7927689caae389b1908fcb",
    "train_tokenizer": "a910470908466991a6d95a8872181c4e682970b72458c4333a8f509ec215d258",
    "tokenize": "02da516602691498c39acadf8d2e827060ab90566c8353609008f6651265a6a9",
    "train": "9f0a39c3bb9d6700ebac506390e44a557bbc0fd218e81050a8690cb5399a1b27",
    "quantize": "39c50b0ecdf7c3c6c1d052bfe191584091a6266d6f92a9ba6a82ac05ccf66ab5",
    "evaluate": "94bb99662a01af2ba6a05fe04a46ebc09fdfc18998f1738c140ec7902ddcc1ff",
    "publish": "d8fd9d1f7112742915674e86bc0866d231adc52518574055dff3786443366269",
}


def test_default_keys_are_unchanged():
    config = PipelineConfig.model_validate({"name": "keys", "download": {"sources": [{"path": "/data/corpus.txt"}]}})
    keys = {
        stage.name: compute_key(stage.name, stage.version, stage.params(getattr(config, stage.name)), {})
        for stage in STAGES
    }
    changed = sorted(name for name in KEYS if keys[name] != KEYS[name])
    assert not changed, f"the store keys of {changed} changed: every cached artifact of them (and after) reruns"
    assert set(keys) == set(KEYS)


def test_every_stage_has_a_config_section_of_its_name():
    assert [name for name in PipelineConfig.model_fields if name not in ("name", "store", "schedule", "runner")] == [
        stage.name for stage in STAGES
    ]
