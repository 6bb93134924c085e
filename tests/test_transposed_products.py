"""`PagedLlama.with_transposed_products`: the products over transposed weight copies give the plain model's
logits within float rounding (tiny random Llama, CPU, float32), and the copies are (in, out) and contiguous."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from model_fixtures import make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.transposed_products import linear_t, plus_linear_t, transposed


def test_transposed_model_gives_the_plain_models_logits_and_shares_its_weights():
    lm = tiny_model()
    plain = PagedLlama.from_hf(lm.model)
    model = plain.with_transposed_products()
    assert model.layers is plain.layers and plain._transposed is None and model._transposed is not None
    first, w = model._transposed[0], plain.layers[0]
    assert first.qkv.shape == w.qkv.t().shape and first.qkv.is_contiguous() and torch.equal(first.qkv, w.qkv.t())
    assert torch.equal(model._lm_head_t, plain.lm_head.t())
    a, b = random_ids(10, seed=1), random_ids(7, seed=2)
    inputs = PackedInputs.pack([(a, 0, [0, 1, 2]), (b, 0, [5, 6])], plain.device, 4)
    expected = plain.forward_packed(make_paged(lm, block_size=4).pool.kv, inputs, all_logits=True)
    got = model.forward_packed(make_paged(lm, block_size=4).pool.kv, inputs, all_logits=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_products_with_and_without_bias_equal_f_linear():
    torch.manual_seed(0)
    x, h, weight, bias = torch.randn(5, 8), torch.randn(5, 6), torch.randn(6, 8), torch.randn(6)
    wt = transposed(weight)
    for b in (None, bias):
        torch.testing.assert_close(linear_t(x, wt, b), F.linear(x, weight, b))
        torch.testing.assert_close(plus_linear_t(h, x, wt, b), h + F.linear(x, weight, b))
