"""End to end with the real embedded SmolLM2-135M-Instruct (slow: converted once per machine, ~30 s)."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import baseline_generate, common_prefix, make_paged, smollm_model

from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.convert import FINGERPRINT_RECORD
from ultra_adaptive_kv_cache_engine.model.fingerprint import files_fingerprint
from ultra_adaptive_kv_cache_engine.model.generation import generate_with_prefix_cache
from ultra_adaptive_kv_cache_engine.model.loader import load_model

pytestmark = pytest.mark.slow
NEW = 8
SYSTEM = "You are a terse assistant. Answer in one short sentence. " * 4


@pytest.fixture(scope="module")
def smollm():
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other up to 10x longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smollm_model()
    torch.set_num_threads(threads)


def run(lm, paged, ids, mask=None):
    return generate_with_prefix_cache(lm.model, paged, ids, mask, max_new_tokens=NEW, do_sample=False)


def test_embedded_model_loads_from_its_conversion_with_a_recorded_fingerprint(smollm):
    folder = smollm.path
    assert folder is not None and folder.parent == KVCacheConfig().model_dir
    assert smollm.model_id == "SmolLM2-135M-Instruct.Q4_1" and smollm.max_context == 8192
    shape = smollm.kv_shape
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (30, 3, 64)
    record = json.loads((folder / FINGERPRINT_RECORD).read_text())
    assert record["sha256"] == smollm.weights_fingerprint == files_fingerprint(sorted(folder.glob("*.safetensors")))
    again = load_model(KVCacheConfig(device="cpu"))  # from safetensors now, no conversion
    assert again.weights_fingerprint == smollm.weights_fingerprint and again.tokenizer_id == smollm.tokenizer_id
    ids = smollm.tokenizer.chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = smollm.tokenizer.decode(baseline_generate(smollm, ids, NEW)[0, len(ids) :].tolist())
    assert "Paris" in answer


def test_multi_turn_chat_is_exact_and_reuses_turn_one(smollm):
    paged = make_paged(smollm, block_size=16, num_blocks=64)
    codec = smollm.tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a primary color."}]
    turn1 = codec.chat(messages)
    first = run(smollm, paged, [turn1])
    assert torch.equal(first.output_ids, baseline_generate(smollm, turn1, NEW)) and first.cached_tokens == 0
    answer = codec.decode(first.generated_ids[0].tolist())
    turn2 = codec.chat([*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "Another?"}])
    second = run(smollm, paged, [turn2])
    assert torch.equal(second.output_ids, baseline_generate(smollm, turn2, NEW))
    with_kv = first.output_ids[0].tolist()[:-1]  # turn 1 left KV for all its tokens but the last
    common = common_prefix(with_kv, turn2)
    assert second.cached_tokens == common // 16 * 16 > len(turn1) // 16 * 16 - 16


def test_left_padded_batch_sharing_a_system_prompt_is_exact(smollm):
    paged = make_paged(smollm, block_size=16, num_blocks=64)
    codec = smollm.tokenizer
    rows = [
        codec.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in ("What is 2+2?", "Say hello in French, please.")
    ]
    run(smollm, paged, [rows[0]])
    width = max(map(len, rows))
    pad = codec.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    result = run(smollm, paged, ids, mask)
    assert torch.equal(result.output_ids, baseline_generate(smollm, ids, NEW, mask))
    shared = common_prefix(*rows) // 16 * 16
    in_pool = (len(rows[0]) // 16 * 16, shared)  # row 0 ran alone before; row 1 shares the system prompt
    restart = min(min(width - len(r) + c for r, c in zip(rows, in_pool, strict=True)), width - 1)
    assert result.row_cached_tokens == tuple(restart - (width - len(r)) for r in rows)
