"""The scheduler's small parts alone: incremental text with stop strings, batched sampling, the config."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.sampler import Sampler, _nucleus, request_generator
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.model.text import ByteTextCodec

CODEC = ByteTextCodec()


def pieces(text: IncrementalText, ids: list[int]) -> list[str]:
    return [text.add([t]) for t in ids] + [text.finish()]


def test_multi_byte_characters_are_held_until_complete():
    ids = CODEC.encode("añ€x")  # 1 + 2 + 3 + 1 bytes
    text = IncrementalText(CODEC.decode)
    assert pieces(text, ids) == ["a", "", "ñ", "", "", "€", "x", ""]
    assert text.text == "añ€x"


def test_stop_strings_cut_the_text_and_nothing_released_is_taken_back():
    ids = CODEC.encode("hello, world. more")
    text = IncrementalText(CODEC.decode, stops=("world.", "zzz"))
    out = pieces(text, ids)
    assert "".join(out) == "hello, " == text.text and text.stopped
    # the last len("world.") - 1 = 5 characters are held back until the stop string is ruled out or found
    assert out[:13] == ["", "", "", "", "", "h", "e", "l", "l", "o", ",", " ", ""] and not any(out[13:])
    assert text.add(CODEC.encode("again")) == ""  # stopped: nothing more


def test_a_stop_string_across_tokens_and_invalid_bytes_match_a_full_decode():
    ids = [0x41 + 3, 0xE2 + 3, 0x82 + 3, 0x42 + 3, 0xFF + 3, 0x43 + 3]  # A, a truncated €, B, a bad byte, C
    text = IncrementalText(CODEC.decode)
    assert "".join(pieces(text, ids)) == CODEC.decode(ids)
    stopped = IncrementalText(CODEC.decode, stops=("B\ufffd",))
    assert "".join(pieces(stopped, ids)) == CODEC.decode(ids)[: CODEC.decode(ids).index("B\ufffd")]


def test_greedy_rows_take_the_first_maximum_and_sampled_rows_their_own_generator():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    greedy, hot = SamplingParams(4), SamplingParams(4, temperature=1.0, seed=3)
    sampler = Sampler()
    gen = request_generator(hot, torch.device("cpu"))
    first = sampler.sample(logits, [greedy, hot, greedy], [None, gen, None])
    assert first[0] == 1 and first[2] == 3
    again = sampler.sample(logits, [greedy, hot, greedy], [None, request_generator(hot, torch.device("cpu")), None])
    assert again == first  # the same seed draws the same token
    assert request_generator(greedy, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="for 2 params"):
        sampler.sample(logits, [greedy, greedy], [None, None])


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]])
    kept = _nucleus(probs, torch.tensor([0.7, 0.5]))
    assert torch.equal(kept > 0, torch.tensor([[True, True, False, False], [False, True, False, False]]))
    everything = _nucleus(probs, torch.tensor([1.0, 1.0]))
    assert torch.equal(everything, probs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_running": 0}, "max_running=0"), ({"max_step_tokens": True}, "max_step_tokens=True"),
     ({"max_waiting": -1}, "max_waiting=-1"), ({"admission_headroom": 1.0}, "admission_headroom=1.0"),
     ({"backend": 3}, "backend=3")],
)
def test_scheduler_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)
