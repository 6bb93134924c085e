"""`PagedLlama.forward_packed(all_logits=True)`: the logits of every packed token, equal to transformers' own."""

from __future__ import annotations

import torch
from model_fixtures import make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama


def test_all_logits_are_every_tokens_logits():
    lm = tiny_model()
    model = PagedLlama.from_hf(lm.model)
    pool = make_paged(lm, block_size=4).pool.kv
    a, b = random_ids(10, seed=1), random_ids(7, seed=2)
    inputs = PackedInputs.pack([(a, 0, [0, 1, 2]), (b, 0, [5, 6])], model.device, 4)
    logits = model.forward_packed(pool, inputs, all_logits=True)
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (17, lm.model.config.vocab_size)
    with torch.no_grad():
        expected = torch.cat([lm.model(torch.tensor([ids])).logits[0].float() for ids in (a, b)])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    last = model.forward_packed(make_paged(lm, block_size=4).pool.kv, inputs)
    torch.testing.assert_close(last, logits[[9, 16]], rtol=0, atol=1e-5)
