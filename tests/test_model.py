"""The model package: shapes, loss at init, GQA, KV-cache generation, save/load, int8."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open

from ember.model.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint, save_model
from ember.model.generate import generate
from ember.model.quantize import INT8_WEIGHTS, linear_weight_bytes, load_int8, quantize_int8, save_int8
from ember.model.transformer import PRESETS, ModelConfig, Transformer

VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, **{**PRESETS["tiny"], **overrides})).eval()


def lively(model: Transformer) -> Transformer:
    """Weights large enough that greedy decoding does not just repeat one token."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa-2", "mqa"])
def test_forward_shapes_and_loss_at_init(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, VOCAB, (3, 40))
    targets = torch.randint(0, VOCAB, (3, 40))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 40, VOCAB)
    # Small init: predictions are near uniform, so the loss is about ln(vocab).
    assert abs(loss.item() - math.log(VOCAB)) < 0.1
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, VOCAB)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-5)


def test_gqa_has_fewer_kv_params_and_is_causal():
    mha, gqa = tiny(n_kv_heads=4), tiny(n_kv_heads=2)
    assert gqa.layers[0].attention.wk.weight.shape == (32, 64)
    assert mha.num_params() - gqa.num_params() == 2 * 2 * 64 * 32  # wk and wv halve, 2 layers
    # Causality: changing a later token leaves earlier logits alone.
    idx = torch.randint(0, VOCAB, (1, 20))
    changed = idx.clone()
    changed[0, 15] = (changed[0, 15] + 1) % VOCAB
    a, _ = gqa(idx, idx)
    b, _ = gqa(changed, changed)
    assert torch.equal(a[0, :15], b[0, :15]) and not torch.equal(a[0, 15:], b[0, 15:])


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cached_generation_matches_uncached(n_kv_heads):
    model = lively(tiny(n_kv_heads=n_kv_heads))
    prompt = [5, 17, 99, 3]
    cached = list(generate(model, prompt, 50, temperature=0))
    assert cached == greedy_without_cache(model, prompt, 50)
    assert len(set(cached)) > 5  # a real test, not a constant sequence


def test_generation_seeded_eos_and_sliding_context():
    model = lively(tiny())
    first = list(generate(model, [1, 2, 3], 30, temperature=1.0, top_k=20, top_p=0.9, seed=7))
    assert first == list(generate(model, [1, 2, 3], 30, temperature=1.0, top_k=20, top_p=0.9, seed=7))
    assert first != list(generate(model, [1, 2, 3], 30, temperature=1.0, top_k=20, top_p=0.9, seed=8))
    # Stops before the EOS id, without yielding it.
    stop = first[10]
    assert list(generate(model, [1, 2, 3], 30, temperature=1.0, top_k=20, top_p=0.9, seed=7, eos_id=stop)) \
        == first[:first.index(stop)]
    # Longer than the 64-token context (and a prompt longer than it): slides, keeps going.
    assert len(list(generate(model, list(range(100)), 150, temperature=0))) == 150


def test_save_load_round_trip_is_exact(tmp_path):
    model = lively(tiny())
    save_model(model, tmp_path, extra={"tokenizer": {"eos_id": 2}})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["n_kv_heads"] == 2 and config["tokenizer"] == {"eos_id": 2}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "tok_embeddings.weight" in names and not any("output" in n for n in names)  # tied: stored once
    loaded = load_model(tmp_path)
    assert not loaded.training
    idx = torch.randint(0, VOCAB, (2, 64))
    assert torch.equal(loaded(idx, idx)[0], model(idx, idx)[0])


def per_tensor_int8(model: Transformer) -> torch.nn.Module:
    """PyTorch's default dynamic scheme: one scale per weight matrix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


@pytest.mark.parametrize("quantize, scale_shape", [(quantize_int8, (64,)), (per_tensor_int8, ())],
                         ids=["per_channel", "per_tensor"])
def test_int8_round_trip_matches_in_memory_model(tmp_path, quantize, scale_shape):
    model = lively(tiny())
    qmodel = quantize(model)
    save_int8(qmodel, tmp_path, extra={"int8": {"scheme": "dynamic-int8"}})
    with safe_open(tmp_path / INT8_WEIGHTS, "pt") as f:
        assert f.get_tensor("layers.0.attention.wq.weight_int8").dtype == torch.int8
        assert f.get_tensor("layers.0.attention.wq.weight_scale").shape == scale_shape
    loaded = load_int8(tmp_path)
    idx = torch.randint(0, VOCAB, (2, 64))
    q_logits = qmodel(idx, idx)[0]
    assert torch.equal(loaded(idx, idx)[0], q_logits)
    assert list(generate(loaded, [1, 2], 20, seed=3)) == list(generate(qmodel, [1, 2], 20, seed=3))


def test_int8_is_close_to_fp32_and_under_a_third_of_its_linear_bytes():
    model = tiny()
    qmodel = quantize_int8(model)
    idx = torch.randint(0, VOCAB, (2, 64))
    fp32, int8 = model(idx, idx)[0], qmodel(idx, idx)[0]
    assert not torch.equal(fp32, int8)
    assert (int8 - fp32).abs().mean() < 0.05 * fp32.abs().mean()
    assert linear_weight_bytes(qmodel) <= 0.3 * linear_weight_bytes(model)
    assert model.layers[0].attention.wq.weight.dtype == torch.float32  # the input model is left alone


# Exact parameter counts at vocab 32000 (tied embedding counted once).
PRESET_PARAMS = {
    "cpu": 11_340_032,
    "small": 137_841_408,
    "medium": 435_471_360,
    "large": 2_213_152_768,
}


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=32000, **PRESETS[name]))
    assert model.num_params() == PRESET_PARAMS[name]


def test_training_checkpoint_resume_state(tmp_path):
    model = tiny()
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95))
    idx = torch.randint(0, VOCAB, (2, 16))
    for step in (1, 2):
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(tmp_path, step, model, optimizer, elapsed_s=1.5 * step, extra={"records": [{"step": step}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000002"]
    assert latest_checkpoint(tmp_path).name == "ckpt-00000002"

    fresh = tiny()
    fresh_opt = fresh.configure_optimizer(0.1, 1e-3, (0.9, 0.95))
    state = load_checkpoint(tmp_path, fresh, fresh_opt)
    assert state["step"] == 2 and state["elapsed_s"] == 3.0 and state["extra"]["records"] == [{"step": 2}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert load_checkpoint(tmp_path / "nothing-here", fresh, fresh_opt) is None


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8, max_seq_len=8)
