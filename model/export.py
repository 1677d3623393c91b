"""Export an Ember checkpoint for other runtimes: a Hugging Face Llama folder and a llama.cpp GGUF file.

Ember's transformer is a Llama (pre-norm RMSNorm, SwiGLU, rotary positions in Hugging Face's
rotate-half layout, tied embedding, optional grouped-query attention), so `export_hf` is a
renaming of tensors plus a `config.json`: `LlamaForCausalLM` gives the same logits (the tests
check 1e-4). `export_gguf` writes what llama.cpp's `convert_hf_to_gguf.py` would write for that
Hugging Face folder, without the round trip: the same metadata keys, llama.cpp's tensor names,
Q and K permuted exactly as the converter's `LlamaModel.permute` does (llama.cpp's Llama rotary
pairs adjacent dimensions, Hugging Face's pairs i with i + head_dim/2), norms kept in f32, and
no `output.weight` (llama.cpp reuses `token_embd.weight` when it is missing, which is the tie).

The tokenizer goes into the GGUF as llama.cpp's byte-level BPE (`tokenizer.ggml.model = "gpt2"`):
tokens in id order as tokenizer.json spells them, merges, special ids, no BOS added.
`tokenizer.ggml.pre` must be a name llama.cpp knows (`llama-vocab.cpp` refuses others), and
none of them splits like Ember (Han and kana one character per piece, digits in groups of one
to three that keep a preceding space, GPT-2's regex for the rest). No known name splits Han per
character; "llama-bpe", "deepseek-v3" and the like cap digits at three but never attach the space
to them and replace GPT-2's regex by their own. We write "gpt-2": the same GPT-2 regex,
applied to the whole text instead of to the pieces between Ember's CJK and digit splits. So
llama.cpp's tokens differ from Ember's only where that split matters:

- runs of more than three digits ("2024", "016000") reach BPE as one piece, which Ember's
  merges may split otherwise than Ember's left-to-right groups of three ("20"+"24" for "202"+"4");
- a whitespace run right before a Han/kana character or a digit: Ember's split ends the piece
  there, so the whole run is one piece ("\\n\\n    " before 却, "\\n\\n" before "34"), while
  GPT-2's regex leaves its last character to the next piece ("\\n\\n   " + " 却...", "\\n" + "\\n");
- Han and kana runs, with the space or letters before them, reach BPE as one piece; Ember's
  merges were learned inside its pieces, so practically none joins across those boundaries and
  the characters still come out one at a time.

Measured with a vocab-8192 Ember tokenizer against GPT-2's pre-tokenizer alone (what "gpt-2"
runs): 3 of 329,852 tokens differ on two Gutenberg books, 0.27% on messy web pages (half
numbers, half whitespace), 0.36% on Chinese novels (all of it the indentation before a
paragraph), none on 2,000 Chinese poems or the mojibake cases; "llama-bpe" and "deepseek-v3"
change 2.1% of the book tokens and 5.4% of the web tokens. A difference is another segmentation
of the same bytes: it decodes to the same text. Beyond the pre-tokenizer: llama.cpp's
`llama_detokenize` (not the token-by-token text llama-cli and llama-server print) cleans up
spaces (" ." -> "."), which Ember turns off; a prompt parsed with special tokens on turns a
literal "<eos>" into the EOS token, where Ember keeps it as text; and a tokenizer trained with
`normalize_nfc` loses its NFC normalizer, which a GGUF cannot express.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from ember.model.checkpoint import load_model, read_config
from ember.model.tokenizer import SPECIAL_IDS, TOKENIZER_FILES, TOKENIZER_JSON
from ember.model.transformer import ModelConfig, Transformer

LLAMA_CPP_PRE_TOKENIZER = "gpt-2"  # the closest name llama.cpp knows; see the module docstring

# Ember parameter (inside `layers.N.`) -> Hugging Face Llama parameter (inside `model.layers.N.`)
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}

GGUF_FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face Llama names (the tied embedding once, no lm_head)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name in HF_TOP_NAMES:
            hf_name = HF_TOP_NAMES[name]
        else:
            _, layer, rest = name.split(".", 2)  # "layers", N, the parameter inside the block
            hf_name = f"model.layers.{layer}.{HF_LAYER_NAMES[rest]}"
        # safetensors wants contiguous tensors that share no storage
        out[hf_name] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def special_ids(model_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids from the checkpoint's config.json ("tokenizer" section), else Ember's."""
    _, config = read_config(model_dir)
    return {**SPECIAL_IDS, **{k: int(v) for k, v in config.get("tokenizer", {}).items() if k in SPECIAL_IDS}}


def hf_config(cfg: ModelConfig, ids: dict[str, int]) -> dict[str, Any]:
    """config.json of the equivalent `LlamaForCausalLM`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x and llama.cpp's converter read rope_theta; transformers 5 reads
        # rope_parameters (and folds a top-level rope_theta into it).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": ids["bos_id"],
        "eos_token_id": ids["eos_id"],
        "pad_token_id": ids["pad_id"],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _check_tokenizer_dir(tokenizer_dir: Path) -> None:
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{tokenizer_dir}: missing tokenizer file(s) {', '.join(missing)}")


def export_hf(model_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Write a Hugging Face Llama folder (`AutoModelForCausalLM.from_pretrained(out)`) into `out`."""
    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out)
    _check_tokenizer_dir(tokenizer_dir)
    model = load_model(model_dir)
    cfg, ids = model.config, special_ids(model_dir)
    out.mkdir(parents=True, exist_ok=True)

    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    # train_tokenizer leaves the length open ("no limit"); the exported model's context is known.
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = cfg.max_seq_len
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    save_file(hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # config.json last: a folder cut short by a crash does not load as a model.
    (out / "config.json").write_text(json.dumps(hf_config(cfg, ids), indent=2) + "\n")
    return out


# -- GGUF -----------------------------------------------------------------------------------------


def permute_for_llama_cpp(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order to llama.cpp's adjacent pairs.

    `LlamaModel.permute` of convert_hf_to_gguf.py, called as permute(q, n_head, n_head) and
    permute(k, n_head, n_kv_head), i.e. with the number of heads the matrix holds.
    """
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) for every weight, q and k permuted."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    for hf_name, tensor in hf_state_dict(model).items():
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, cfg.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, cfg.n_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no llama.cpp name for tensor {hf_name!r}")
        yield name, tensor


def _encode_tensor(
    name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray[Any, Any], gguf.GGMLQuantizationType]:
    """(numpy data, ggml type) the way the converter stores it."""
    data = tensor.numpy()
    # llama.cpp handles 1-D tensors and norms in f32 only.
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: the converter falls back to f16
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def gguf_vocab(tokenizer_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings in id order, their llama.cpp token types, and the merges, from tokenizer.json.

    As the converter's `get_vocab_base`: special added tokens are CONTROL, other added tokens
    USER_DEFINED, ids the tokenizer lacks up to the model's vocab_size "[PAD<id>]" and UNUSED.
    """
    path = tokenizer_dir / TOKENIZER_JSON
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tok.get("pre_tokenizer")):
        raise ValueError(f"{path}: not a byte-level BPE tokenizer; llama.cpp's 'gpt2' model would misread it")
    by_id = {i: token for token, i in model["vocab"].items()}
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise ValueError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")

    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    merges = model.get("merges", [])
    if merges and not isinstance(merges[0], str):
        # tokenizers >= 0.20 saves [left, right] pairs; llama.cpp wants "left right", spaces
        # spelled as U+0120 the way gguf's SpecialVocab does (byte-level tokens have none).
        merges = [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]
    return tokens, [int(t) for t in types], merges


def export_gguf(
    model_dir: Path, tokenizer_dir: Path, out_path: Path, outtype: Literal["f32", "f16", "q8_0"] = "f16"
) -> Path:
    """Write a llama.cpp GGUF file (architecture "llama") of the checkpoint and its tokenizer."""
    if outtype not in GGUF_FILE_TYPES:
        raise ValueError(f"outtype must be one of {', '.join(GGUF_FILE_TYPES)}, got {outtype!r}")
    model_dir, tokenizer_dir, out_path = Path(model_dir), Path(tokenizer_dir), Path(out_path)
    _check_tokenizer_dir(tokenizer_dir)
    model = load_model(model_dir)
    cfg, ids = model.config, special_ids(model_dir)
    file_type, qtype = GGUF_FILE_TYPES[outtype]
    tokens, token_types, merges = gguf_vocab(tokenizer_dir, cfg.vocab_size)
    for key in ("bos_id", "eos_id", "pad_id"):
        if token_types[ids[key]] != gguf.TokenType.CONTROL:
            raise ValueError(
                f"{tokenizer_dir / 'tokenizer.json'}: {key} {ids[key]} ({tokens[ids[key]]!r}) is not a special token"
            )

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("ember")
    # Hyperparameters: TextModel.set_gguf_parameters + LlamaModel's of the converter.
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    # Tokenizer: _set_vocab_gpt2 + SpecialVocab of the converter.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(LLAMA_CPP_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos_id"])
    writer.add_eos_token_id(ids["eos_id"])
    writer.add_pad_token_id(ids["pad_id"])
    writer.add_add_bos_token(False)  # Ember trains on documents followed by EOS, never preceded by BOS
    writer.add_add_eos_token(False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for name, tensor in gguf_tensors(model):
        data, dtype = _encode_tensor(name, tensor, qtype)
        writer.add_tensor(name, data, raw_dtype=dtype)

    # Written beside the target and renamed: a crash never leaves a short file under the final name.
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path
