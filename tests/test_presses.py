"""Token-eviction presses: budgets, the registry, each press's exact choice in tiny worlds, and the names of
pressed blocks."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression.presses import (
    PRESSES,
    KeysNormPress,
    LayerObservation,
    PressConfig,
    SinksWindowPress,
    SnapKVPress,
    keep_top,
    make_press,
    press_namespace,
    pressed_block_hashes,
    prompt_name,
)
from ultra_adaptive_kv_cache_engine.prefix import Namespace, hash_block, hash_blocks

BASE = Namespace("m", "w", "t", "float32", 4, 1)


# -- config and registry --------------------------------------------------------------------------------------
def test_budget_by_ratio_or_tokens():
    assert [PressConfig("snapkv", ratio=0.5).budget(n) for n in (1, 7, 8, 768)] == [1, 4, 4, 384]
    assert [PressConfig("snapkv", ratio=0.25).budget(n) for n in (3, 9)] == [1, 3]
    assert [PressConfig("sinks_window", tokens=6).budget(n) for n in (4, 6, 100)] == [4, 6, 6]
    assert PressConfig("snapkv", ratio=1).budget(5) == 5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "exactly one of ratio or tokens"),
    ({"ratio": 0.5, "tokens": 3}, "exactly one of ratio or tokens"),
    ({"ratio": 0.0}, "ratio=0.0 must be a number in"),
    ({"ratio": 1.5}, "ratio=1.5 must be a number in"),
    ({"ratio": True}, "ratio=True"),
    ({"tokens": 0}, "tokens=0 must be a positive integer"),
    ({"tokens": 2.0}, "tokens=2.0"),
    ({"tokens": 4, "params": {"window": [1]}}, r"params\['window'\]"),
])
def test_bad_configs_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PressConfig("snapkv", **kwargs)
    with pytest.raises(ValueError, match="must be a positive integer"):
        PressConfig("snapkv", tokens=4).budget(0)


def test_params_are_normalised_to_sorted_pairs_and_the_config_is_hashable():
    a = PressConfig("snapkv", tokens=8, params={"window": 4, "kernel": 3})
    b = PressConfig("snapkv", tokens=8, params=(("kernel", 3), ("window", 4)))
    assert a == b and hash(a) == hash(b) and a.params == (("kernel", 3), ("window", 4))
    assert a.describe() == "snapkv(kernel=3,window=4)"


def test_registry_builds_each_press_and_names_unknown_ones():
    assert sorted(PRESSES) == ["keys_norm", "sinks_window", "snapkv"]
    assert make_press(PressConfig("sinks_window", tokens=8, params={"sinks": 2})) == SinksWindowPress(sinks=2)
    assert make_press(PressConfig("snapkv", ratio=0.5)) == SnapKVPress(window=32, kernel=7, pooling="max", sinks=4,
                                                                        recent=0.9)
    with pytest.raises(ValueError, match="unknown press 'h3o'; expected one of: keys_norm, sinks_window, snapkv"):
        make_press(PressConfig("h3o", ratio=0.5))
    with pytest.raises(ValueError, match="press 'snapkv' has no parameter 'size'; expected: kernel, pooling, recent, "
                                         "sinks, window"):
        make_press(PressConfig("snapkv", ratio=0.5, params={"size": 4}))
    with pytest.raises(ValueError, match=r"recent=1.5 must be a share of the kept tokens in \[0, 1\]"):
        SnapKVPress(recent=1.5)
    with pytest.raises(ValueError, match="sinks=-1 must be a non-negative integer"):
        SnapKVPress(sinks=-1)
    with pytest.raises(ValueError, match="pooling='median'; expected one of: avg, max"):
        make_press(PressConfig("snapkv", ratio=0.5, params={"pooling": "median"}))
    with pytest.raises(ValueError, match="kernel=4 must be a positive odd integer"):
        SnapKVPress(kernel=4)
    with pytest.raises(ValueError, match="sinks=-1"):
        SinksWindowPress(sinks=-1)


# -- selections -----------------------------------------------------------------------------------------------
def test_keep_top_forces_then_ranks_with_earlier_ties_first():
    scores = torch.tensor([[5.0, 1.0, 1.0, 9.0, 0.0, 2.0], [0.0, 3.0, 3.0, 3.0, 7.0, 0.0]])
    forced = torch.tensor([False, False, False, False, False, True])
    assert keep_top(scores, 3, forced).tolist() == [[0, 3, 5], [1, 4, 5]]
    assert keep_top(scores, 4, forced).tolist() == [[0, 1, 3, 5], [1, 2, 4, 5]]  # ties: 1 before 2
    many = torch.tensor([True, True, False, True, False, True])
    assert keep_top(scores, 2, many).tolist() == [[3, 5], [3, 5]]  # the last forced ones


def test_sinks_window_keeps_the_first_and_the_last_tokens():
    obs = LayerObservation(layer=0, length=12, num_kv_heads=2)
    assert SinksWindowPress().select(obs, 7).tolist() == [[0, 1, 2, 3, 9, 10, 11]] * 2
    assert SinksWindowPress(sinks=0).select(obs, 3).tolist() == [[9, 10, 11]] * 2
    assert SinksWindowPress(sinks=4).select(obs, 2).tolist() == [[0, 1]] * 2
    assert SinksWindowPress().select(obs, 12).tolist() == [list(range(12))] * 2
    with pytest.raises(ValueError, match=r"kept=13 must be an int in \[1, 12\]"):
        SinksWindowPress().select(obs, 13)


def _attention(rows: list[list[float]], q_heads: int) -> torch.Tensor:
    """(q_heads, window, length): the same rows for every head, scaled by (head + 1)."""
    base = torch.tensor(rows)
    return torch.stack([base * (h + 1) for h in range(q_heads)])


def test_snapkv_votes_pools_and_keeps_its_window():
    # 8 tokens, window 2 (tokens 6, 7 always kept); votes over tokens 0..5 summed over the 2 window rows.
    rows = [[0.0, 0.1, 0.0, 0.0, 0.5, 0.0, 0.4, 0.0], [0.2, 0.0, 0.0, 0.3, 0.1, 0.0, 0.2, 0.2]]
    obs = LayerObservation(0, 8, 1, attention=_attention(rows, 2))
    press = SnapKVPress(window=2, kernel=1, sinks=0, recent=0)
    votes = press.scores(obs)  # mean over the 2 query heads of 1x and 2x the rows: 1.5x the row sums
    torch.testing.assert_close(votes, torch.tensor([[0.3, 0.15, 0.0, 0.45, 0.9, 0.0, 0.0, 0.0]]))
    assert press.select(obs, 4).tolist() == [[3, 4, 6, 7]]
    assert press.select(obs, 5).tolist() == [[0, 3, 4, 6, 7]]
    assert press.select(obs, 1).tolist() == [[7]]  # fewer kept than the window: its last tokens
    pooled = SnapKVPress(window=2, kernel=3, pooling="max").scores(obs)
    torch.testing.assert_close(pooled, torch.tensor([[0.3, 0.3, 0.45, 0.9, 0.9, 0.9, 0.0, 0.0]]))
    assert SnapKVPress(window=2, kernel=3, pooling="max", sinks=0, recent=0).select(obs, 4).tolist() == [[3, 4, 6, 7]]


def test_snapkv_hybrid_keeps_sinks_and_a_recent_share_then_the_best_scored():
    rows = [[0.0, 0.1, 0.0, 0.0, 0.5, 0.0, 0.4, 0.0], [0.2, 0.0, 0.0, 0.3, 0.1, 0.0, 0.2, 0.2]]
    obs = LayerObservation(0, 8, 1, attention=_attention(rows, 2))  # votes 0.3, 0.15, 0, 0.45, 0.9, 0 (0..5)
    assert SnapKVPress(window=2, kernel=1, sinks=1, recent=0.5).select(obs, 6).tolist() == [[0, 3, 4, 5, 6, 7]]
    assert SnapKVPress(window=2, kernel=1, sinks=2, recent=0.5).select(obs, 6).tolist() == [[0, 1, 4, 5, 6, 7]]
    assert SnapKVPress(window=2, kernel=1, sinks=2, recent=0).select(obs, 5).tolist() == [[0, 1, 4, 6, 7]]
    # the recent share covers the budget: no room for sinks, the last `kept` tokens
    assert SnapKVPress(window=2, kernel=1, sinks=4, recent=1.0).select(obs, 3).tolist() == [[5, 6, 7]]


def test_snapkv_chooses_per_kv_head_from_its_query_group():
    # 2 KV heads of 2 query heads each: head 0's group looks at token 1, head 1's at token 4.
    attention = torch.zeros(4, 1, 6)
    attention[0:2, 0, 1] = 1.0
    attention[2:4, 0, 4] = 1.0
    obs = LayerObservation(0, 6, 2, attention=attention)
    assert SnapKVPress(window=1, kernel=1, sinks=0, recent=0).select(obs, 2).tolist() == [[1, 5], [4, 5]]
    with pytest.raises(ValueError, match=r"needs the attention \(q_heads, 1, 6\)"):
        SnapKVPress(window=1).select(LayerObservation(0, 6, 2), 2)


def test_keys_norm_keeps_the_lowest_norms_per_head():
    keys = torch.zeros(5, 2, 2)
    keys[:, 0, 0] = torch.tensor([3.0, 1.0, 4.0, 0.5, 2.0])
    keys[:, 1, 1] = torch.tensor([0.1, 9.0, 8.0, 7.0, 0.2])
    obs = LayerObservation(0, 5, 2, keys=keys)
    assert KeysNormPress().select(obs, 2).tolist() == [[1, 3], [0, 4]]
    assert KeysNormPress(window=1).select(obs, 2).tolist() == [[3, 4], [0, 4]]
    with pytest.raises(ValueError, match="keys_norm needs keys"):
        KeysNormPress().select(LayerObservation(0, 5, 2), 2)


# -- names ----------------------------------------------------------------------------------------------------
def test_press_namespace_names_the_press_its_parameters_and_budget():
    half = PressConfig("snapkv", ratio=0.5, params={"window": 8})
    ns = press_namespace(BASE, half)
    assert ns.codec == "identity|press:snapkv(window=8);ratio=0.5"
    assert (ns.model_id, ns.block_size, ns.tenant_salt) == (BASE.model_id, 4, "")
    others = [PressConfig("snapkv", ratio=0.25, params={"window": 8}), PressConfig("snapkv", ratio=0.5),
              PressConfig("sinks_window", ratio=0.5), PressConfig("snapkv", tokens=8, params={"window": 8})]
    digests = {press_namespace(BASE, c).digest for c in [half, *others]} | {BASE.digest}
    assert len(digests) == 6
    assert press_namespace(BASE.with_tenant("b"), half).digest != ns.digest
    with pytest.raises(ValueError, match="unknown press"):
        press_namespace(BASE, PressConfig("nope", ratio=0.5))


def test_pressed_blocks_chain_from_the_whole_prompt():
    config = PressConfig("sinks_window", ratio=0.5)
    pressed = press_namespace(BASE, config)
    prompt = list(range(10, 20))  # 2 full blocks of 4 and a tail of 2
    full = hash_blocks(prompt, BASE, 4)
    root = hash_block(full[-1], prompt[8:], pressed)
    assert prompt_name(prompt, BASE, pressed) == root
    names = pressed_block_hashes(prompt, BASE, config, 8)
    assert names == [hash_block(root, (0, 8), pressed), hash_block(hash_block(root, (0, 8), pressed), (1, 8), pressed)]
    assert len(pressed_block_hashes(prompt, BASE, config, 7)) == 1  # full pressed blocks only
    assert pressed_block_hashes(prompt, BASE, config, 7)[0] != names[0]  # another kept length
    # Any change of the prompt, even in its last (unhashed-as-a-block) token, renames every pressed block.
    assert pressed_block_hashes([*prompt[:-1], 99], BASE, config, 8)[0] != names[0]
    assert pressed_block_hashes(prompt[:9], BASE, config, 8)[0] != names[0]
    assert not set(names) & set(full)
    with pytest.raises(ValueError, match=r"kept=11 must be an int in \[1, 10\]"):
        pressed_block_hashes(prompt, BASE, config, 11)
