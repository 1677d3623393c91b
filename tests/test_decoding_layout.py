"""use_decoding_layout: the same model, laid out in memory for one-row products on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from ember.model.checkpoint import load_model, save_model
from ember.model.decoding import usable_fused, use_decoding_layout
from ember.model.generate import generate
from ember.model.quantize import quantize_weight_only_int8
from test_model import VOCAB, block, greedy_without_cache, lively, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [5, 17, 99, 3]


def column_major(w: torch.Tensor) -> bool:
    return w.stride() == (1, w.stride(1)) and w.stride(1) >= w.size(0) and not w.is_contiguous()


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_same_values_same_tokens_new_layout(n_kv_heads):
    reference = lively(tiny(n_kv_heads=n_kv_heads))
    model = copy.deepcopy(reference)
    use_decoding_layout(model)  # in place

    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    attention, mlp = block(model, 0).attention, block(model, 0).feed_forward
    # wq, wk, wv are column blocks of one matrix, w1 and w3 of another; w2 (deeper than wide)
    # keeps nn.Linear's row-major order; the tied embedding is column-major.
    width = attention.wq.weight.size(0) + 2 * attention.wk.weight.size(0)
    assert attention.wqkv_t is not None and mlp.w13_t is not None
    assert attention.wqkv_t.shape == (64, width) and attention.wqkv_t.is_contiguous()
    assert attention.wq.weight.data_ptr() == attention.wqkv_t.data_ptr()
    assert all(column_major(lin.weight) for lin in (attention.wq, attention.wk, attention.wv, attention.wo))
    assert mlp.w13_t.shape == (64, 2 * mlp.w1.weight.size(0))
    assert mlp.w2.weight.is_contiguous() and mlp.w2.weight.size(0) < mlp.w2.weight.size(1)
    assert column_major(model.tok_embeddings.weight)

    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        assert torch.allclose(model(idx, idx)[0], reference(idx, idx)[0], atol=1e-5)
    cached = list(generate(model, PROMPT, 50, temperature=0))
    assert cached == list(generate(reference, PROMPT, 50, temperature=0))
    assert cached == greedy_without_cache(reference, PROMPT, 50)
    assert len(set(cached)) > 5


def test_fused_matrices_stand_in_only_without_gradients_and_while_shared():
    reference = lively(tiny())
    model = copy.deepcopy(reference)
    use_decoding_layout(model)  # in place
    attention = block(model, 0).attention
    linears = (attention.wq, attention.wk, attention.wv)
    with torch.no_grad():
        assert usable_fused(attention.wqkv_t, *linears) is attention.wqkv_t
    assert usable_fused(attention.wqkv_t, *linears) is None  # grad mode: the parameters, not the copy

    # Training through the new layout reaches every weight, with the reference's gradients.
    idx = torch.randint(0, VOCAB, (2, 20))
    for m in (model, reference):
        m(idx, idx)[1].backward()
    for lin, ref in (
        (attention.wk, block(reference, 0).attention.wk),
        (block(model, 1).feed_forward.w3, block(reference, 1).feed_forward.w3),
    ):
        assert lin.weight.grad is not None and ref.weight.grad is not None
        assert torch.allclose(lin.weight.grad, ref.weight.grad, atol=1e-6)

    # A weight replaced after the layout was chosen is used, not the stale fused copy.
    new_wk = torch.nn.Parameter(torch.randn_like(attention.wk.weight))
    attention.wk.weight = new_wk
    block(reference, 0).attention.wk.weight = torch.nn.Parameter(new_wk.detach().clone())
    with torch.no_grad():
        assert usable_fused(attention.wqkv_t, *linears) is None
        assert torch.allclose(model(idx)[0], reference(idx)[0], atol=1e-5)


def test_loading_weights_into_the_layout_updates_the_fused_matrices(tmp_path):
    model = tiny()
    use_decoding_layout(model)  # in place
    other = lively(tiny())
    model.load_state_dict(other.state_dict())  # copies into the views, so into the fused storage
    assert list(generate(model, PROMPT, 30, temperature=0)) == list(generate(other, PROMPT, 30, temperature=0))

    # Saving writes ordinary row-major files that load back to the same values.
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for name, tensor in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
        assert loaded.state_dict()[name].is_contiguous()


def test_int8_models_keep_their_kernels_and_get_a_faster_output_projection():
    qmodel = quantize_weight_only_int8(lively(tiny()))
    expected = list(generate(qmodel, PROMPT, 30, temperature=0))
    use_decoding_layout(qmodel)
    assert block(qmodel, 0).attention.wqkv_t is None  # not nn.Linear any more: left alone
    assert column_major(qmodel.tok_embeddings.weight)
    assert list(generate(qmodel, PROMPT, 30, temperature=0)) == expected
