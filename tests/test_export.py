"""Export: a Hugging Face Llama folder with Ember's logits, and GGUF files that read back right.

The GGUF side has no llama.cpp here, so `llama_cpp_forward` below is a small reference of what
llama.cpp's "llama" graph computes from the file (adjacent-pair rotary, the hyperparameters read
from the metadata); Ember's logits coming out of it is what checks the Q/K permutation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers

from ember.model.checkpoint import save_model
from ember.model.export import LLAMA_CPP_PRE_TOKENIZER, export_gguf, export_hf
from ember.model.tokenizer import SPECIAL_TOKENS
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.tasks.train_tokenizer import build_tokenizer, write_transformers_files
from helpers import CORPORA

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 512

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_text() -> list[str]:
    """English verse and Chinese novel text, so the tiny vocabulary has merges of both."""
    english = (CORPORA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:150_000]
    with open(CORPORA / "chinese_classic_novels" / "chapters.jsonl", encoding="utf-8") as f:
        chinese = json.loads(next(f))["text"][:20_000]
    return english.split("\n\n") + chinese.split("\n") + ["In 1594, 42 ships; 7 of 100 sank in 2024."] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    write_transformers_files(out)
    return out


def make_checkpoint(folder: Path, n_kv_heads: int) -> Transformer:
    """A tiny model with weights far from init (norm gains too), so a misplaced tensor shows."""
    torch.manual_seed(n_kv_heads)
    cfg = ModelConfig(
        vocab_size=VOCAB, **{**PRESETS["tiny"], "n_kv_heads": n_kv_heads}, rope_theta=500.0, norm_eps=1e-6
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    save_model(model, folder, extra={"tokenizer": {"bos_id": 1, "eos_id": 2, "pad_id": 0}})
    return model


@pytest.fixture(scope="module", params=[4, 2, 1], ids=["mha", "gqa", "mqa"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, Transformer]:
    folder = tmp_path_factory.mktemp(f"model-kv{request.param}")
    return folder, make_checkpoint(folder, request.param)


def ember_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(idx, targets=idx)  # with targets: logits at every position
    return logits


def random_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (1, 5), generator=g), torch.randint(0, VOCAB, (3, 64), generator=g)]


# -- Hugging Face ---------------------------------------------------------------------------------


def test_hf_export_gives_embers_logits(checkpoint, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, model = checkpoint
    out = export_hf(folder, tokenizer_dir, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == model.config.n_kv_heads and config["head_dim"] == 16

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied, not copied
    for idx in random_inputs():
        with torch.no_grad():
            theirs = hf(idx).logits
        assert (theirs - ember_logits(model, idx)).abs().max().item() < 1e-4


def test_hf_tokenizer_loads_and_matches_ember(checkpoint, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    out = export_hf(checkpoint[0], tokenizer_dir, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(out)
    ember = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "Thou art 2024 times fairer, 宝玉 said.\n\n  Go!"
    ids = hf(text, add_special_tokens=True)["input_ids"]
    assert ids == ember.encode(text, add_special_tokens=False).ids  # no BOS/EOS added
    assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.model_max_length == PRESETS["tiny"]["max_seq_len"]


def test_missing_tokenizer_file_is_named(checkpoint, tokenizer_dir, tmp_path):
    partial = tmp_path / "tok"
    partial.mkdir()
    (partial / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        export_hf(checkpoint[0], partial, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="special_tokens_map.json"):
        export_gguf(checkpoint[0], partial, tmp_path / "m.gguf")


# -- GGUF -----------------------------------------------------------------------------------------


def field(reader: gguf.GGUFReader, key: str):
    assert key in reader.fields, f"metadata key {key} missing"
    return reader.fields[key].contents()


def f32_tensors(reader: gguf.GGUFReader) -> dict[str, torch.Tensor]:
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # a copy of F32 data as it is
        out[t.name] = torch.from_numpy(data.copy()).float().reshape(*reversed([int(n) for n in t.shape]))
    return out


def llama_cpp_forward(reader: gguf.GGUFReader, idx: torch.Tensor) -> torch.Tensor:
    """Logits of llama.cpp's "llama" graph: rotary on adjacent pairs (2i, 2i+1), as the file says."""
    w = f32_tensors(reader)
    n_layers = field(reader, "llama.block_count")
    n_head, n_kv = field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv")
    eps, theta = field(reader, "llama.attention.layer_norm_rms_epsilon"), field(reader, "llama.rope.freq_base")
    hs = field(reader, "llama.rope.dimension_count")
    B, T = idx.shape

    angles = torch.arange(T, dtype=torch.float32)[:, None] * theta ** (-torch.arange(0, hs, 2).float() / hs)
    cos, sin = angles.cos(), angles.sin()  # (T, hs/2)

    def rope(x):  # (B, h, T, hs)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    x = w["token_embd.weight"][idx]
    for i in range(n_layers):
        p = {name.split(".")[2]: t for name, t in w.items() if name.startswith(f"blk.{i}.")}
        h = rms(x, p["attn_norm"])
        q = rope((h @ p["attn_q"].T).view(B, T, n_head, hs).transpose(1, 2))
        k = rope((h @ p["attn_k"].T).view(B, T, n_kv, hs).transpose(1, 2))
        v = (h @ p["attn_v"].T).view(B, T, n_kv, hs).transpose(1, 2)
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + y @ p["attn_output"].T
        h = rms(x, p["ffn_norm"])
        x = x + (F.silu(h @ p["ffn_gate"].T) * (h @ p["ffn_up"].T)) @ p["ffn_down"].T
    return rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def expected_names(n_layers: int) -> set[str]:
    per_block = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")
    return {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(n_layers) for name in per_block
    }


def test_gguf_f32_reads_back_as_embers_model(checkpoint, tokenizer_dir, tmp_path):
    folder, model = checkpoint
    path = export_gguf(folder, tokenizer_dir, tmp_path / "m-f32.gguf", outtype="f32")
    reader = gguf.GGUFReader(path)
    cfg = model.config
    assert {t.name for t in reader.tensors} == expected_names(cfg.n_layers)  # tied: no output.weight
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)

    w = f32_tensors(reader)
    layer = model.layers[1]
    assert torch.equal(w["token_embd.weight"], model.tok_embeddings.weight)
    assert torch.equal(w["blk.1.attn_v.weight"], layer.attention.wv.weight)
    assert torch.equal(w["blk.1.attn_output.weight"], layer.attention.wo.weight)
    assert torch.equal(w["blk.1.ffn_gate.weight"], layer.feed_forward.w1.weight)
    assert torch.equal(w["blk.1.ffn_up.weight"], layer.feed_forward.w3.weight)
    assert torch.equal(w["blk.1.ffn_down.weight"], layer.feed_forward.w2.weight)
    assert torch.equal(w["blk.1.attn_norm.weight"], layer.attention_norm.weight)
    assert torch.equal(w["blk.1.ffn_norm.weight"], layer.ffn_norm.weight)
    assert torch.equal(w["output_norm.weight"], model.norm.weight)
    # Q and K hold the same rows, reordered within each head (the permutation).
    for name, ours, heads in (
        ("attn_q", layer.attention.wq.weight, cfg.n_heads),
        ("attn_k", layer.attention.wk.weight, cfg.n_kv_heads),
    ):
        theirs = w[f"blk.1.{name}.weight"]
        assert theirs.shape == ours.shape and not torch.equal(theirs, ours)
        for h in range(heads):
            rows = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
            assert sorted(theirs[rows].sum(1).tolist()) == sorted(ours[rows].sum(1).tolist())

    for idx in random_inputs():
        assert (llama_cpp_forward(reader, idx) - ember_logits(model, idx)).abs().max().item() < 1e-4


def test_gguf_metadata_and_vocab(checkpoint, tokenizer_dir, tmp_path):
    folder, model = checkpoint
    cfg = model.config
    reader = gguf.GGUFReader(export_gguf(folder, tokenizer_dir, tmp_path / "m.gguf"))  # default f16
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": LLAMA_CPP_PRE_TOKENIZER,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(reader, "llama.rope.freq_base") == pytest.approx(500.0)
    assert LLAMA_CPP_PRE_TOKENIZER == "gpt-2"

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert tokens == sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)  # byte-level strings, id order
    assert tokens[:3] == ["<pad>", "<bos>", "<eos>"] and "Ġthe" in tokens
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    assert types == [control] * len(SPECIAL_TOKENS) + [normal] * (VOCAB - len(SPECIAL_TOKENS))
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(pair) for pair in tok["model"]["merges"]]
    types_by_name = {t.name: t.tensor_type for t in reader.tensors}
    assert types_by_name["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types_by_name["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_gguf_q8_0_close_to_weights(checkpoint, tokenizer_dir, tmp_path):
    folder, _ = checkpoint
    exact = f32_tensors(gguf.GGUFReader(export_gguf(folder, tokenizer_dir, tmp_path / "f32.gguf", "f32")))
    reader = gguf.GGUFReader(export_gguf(folder, tokenizer_dir, tmp_path / "q8.gguf", "q8_0"))
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert {t.name for t in reader.tensors} == set(exact)
    for t in reader.tensors:
        want = gguf.GGMLQuantizationType.F32 if t.name.endswith("_norm.weight") else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, t.name
        ours = exact[t.name]
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(ours.shape)
        assert (theirs - ours).abs().max() < 0.01 * ours.abs().max(), t.name


def test_gguf_refuses_unknown_outtype(checkpoint, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="outtype"):
        # Not one of the Literal's values on purpose: the check for callers that pass any string.
        export_gguf(checkpoint[0], tokenizer_dir, tmp_path / "m.gguf", outtype="q4_k")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# -- the pre-tokenizer named in the GGUF ----------------------------------------------------------

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@pytest.mark.parametrize(
    "text",
    [
        "Thou art more lovely and more temperate:\nRough winds do shake the darling buds of May,",
        "In 1594, 42 ships; 7 of 100 sank. I'll say it's 3:15 now.",
        "宝玉 said 你好，世界。 Then 黛玉 left.",
        "  indented\tline\n\n\nand   spaced  words ",
    ],
    ids=["prose", "short_numbers", "cjk_single_spaces", "whitespace"],
)
def test_gpt2_pre_tokenizer_agrees_outside_documented_cases(tokenizer_dir, text):
    """The module docstring's claim: llama.cpp's "gpt-2" (GPT-2's regex over the whole text) gives
    Ember's tokens except on digit runs over three and whitespace runs before CJK or digits."""
    ember = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    gpt2 = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    gpt2.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert gpt2.encode(text).ids == ember.encode(text).ids
