"""Chained SHA-256 block hashing: pinned bytes, determinism across processes, namespaces that separate."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace

import pytest

from ultra_adaptive_kv_cache_engine.prefix import ROOT_PARENT, Namespace, hash_block, hash_blocks

NS = Namespace(
    model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    weights_fingerprint="sha256:abc",
    tokenizer_id="smollm2",
    dtype="float16",
    block_size=4,
    layout_version=1,
)
TOKENS = [1, 2, 3, 4, 5, 6, 7, 8, 9]
# Pinned: a change here is a format change that silently invalidates every stored block.
EXPECTED_NAMESPACE_HEX = "9025017cc105e38f668c385f737945a486a5895913136d3d7916969fe7dcaea5"
EXPECTED_HEX = [
    "6be279008fa86abb763643cad4d6c2dba7f3a8708554384320716c6c74594128",
    "54f7febd2b1d26ce4096c5412b53e7e1aed97b2bb781b595fc2719e96b529d5f",
]

_CHILD = """
from ultra_adaptive_kv_cache_engine.prefix import Namespace, hash_blocks
ns = Namespace("HuggingFaceTB/SmolLM2-135M-Instruct", "sha256:abc", "smollm2", "float16", 4, 1)
print(",".join(h.hex() for h in hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], ns, 4)))
print(hash(("a", "b")))
"""


def test_hashes_are_pinned():
    assert NS.digest.hex() == EXPECTED_NAMESPACE_HEX
    assert [h.hex() for h in hash_blocks(TOKENS, NS, 4)] == EXPECTED_HEX


def test_hash_follows_the_documented_formula():
    fields = {"block_size": 4, "codec": "identity", "dtype": "float16", "layout_version": 1,
              "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "tenant_salt": "", "tokenizer_id": "smollm2",
              "weights_fingerprint": "sha256:abc"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    ns_digest = hashlib.sha256(b"uakv-namespace-v1\0" + canonical.encode()).digest()
    root = hashlib.sha256(b"uakv-block-root-v1").digest()
    first = hashlib.sha256(root + ns_digest + struct.pack("<4q", 1, 2, 3, 4)).digest()
    second = hashlib.sha256(first + ns_digest + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert ROOT_PARENT == root and NS.digest == ns_digest
    assert hash_blocks(TOKENS, NS, 4) == [first, second]
    assert hash_block(None, [1, 2, 3, 4], NS) == first and hash_block(first, [5, 6, 7, 8], NS) == second


def test_hashes_equal_across_processes_with_different_hash_seeds():
    outputs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
        outputs.append(done.stdout.split("\n"))
    assert outputs[0][1] != outputs[1][1]  # the seeds really differ: Python's hash() disagrees
    assert outputs[0][0] == outputs[1][0] == ",".join(EXPECTED_HEX)


def test_only_full_blocks_are_hashed_and_the_chain_carries_the_prefix():
    assert hash_blocks([1, 2, 3], NS, 4) == []
    assert len(hash_blocks(list(range(8)), NS, 4)) == 2
    assert hash_blocks(TOKENS[:8], NS, 4) == hash_blocks(TOKENS, NS, 4)
    # Same second block after a different first block: a different name.
    assert hash_blocks([9, 9, 9, 9, 5, 6, 7, 8], NS, 4)[1] != EXPECTED_HEX[1]
    # Continuing a chain from a parent gives the same names as hashing the whole prefix.
    first = hash_blocks(TOKENS[:4], NS, 4)[0]
    assert hash_blocks(TOKENS[4:], NS, 4, parent=first) == hash_blocks(TOKENS, NS, 4)[1:]


@pytest.mark.parametrize(
    "change",
    [{"model_id": "other"}, {"weights_fingerprint": "sha256:abd"}, {"tokenizer_id": "llama"},
     {"dtype": "bfloat16"}, {"layout_version": 2}, {"codec": "int8"}, {"tenant_salt": "tenant-a"}],
)
def test_every_namespace_field_changes_the_hash(change: dict[str, object]):
    other = replace(NS, **change)
    assert other.digest != NS.digest
    assert hash_block(None, [1, 2, 3, 4], other) != hash_block(None, [1, 2, 3, 4], NS)


def test_tenants_are_separated():
    a, b = NS.with_tenant("tenant-a"), NS.with_tenant("tenant-b")
    assert a.tenant_salt == "tenant-a" and a.model_id == NS.model_id
    assert len({hash_blocks(TOKENS, ns, 4)[0] for ns in (NS, a, b)}) == 3
    assert hash_blocks(TOKENS, NS.with_tenant("tenant-a"), 4) == hash_blocks(TOKENS, a, 4)


def test_block_size_participates():
    ns8 = replace(NS, block_size=8)
    assert hash_blocks(list(range(8)), ns8, 8)[0] != hash_block(None, list(range(8)), NS)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="block_size=8 does not match the namespace's block_size=4"):
        hash_blocks(TOKENS, NS, 8)
    with pytest.raises(ValueError, match="parent=b'short' must be None or 32 bytes"):
        hash_block(b"short", [1], NS)
    with pytest.raises(ValueError, match=r"token_ids\[1\]='x' must be an integer"):
        hash_block(None, [1, "x"], NS)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"token_ids\[0\]=9223372036854775808 does not fit in int64"):
        hash_block(None, [1 << 63], NS)
    with pytest.raises(ValueError, match="not booleans"):
        hash_block(None, [True], NS)
    with pytest.raises(TypeError, match="must be a Namespace"):
        hash_block(None, [1], "ns")  # type: ignore[arg-type]


def test_namespace_validation():
    with pytest.raises(ValueError, match="Namespace.model_id=1 must be a string"):
        replace(NS, model_id=1)
    with pytest.raises(ValueError, match="Namespace.block_size=0"):
        replace(NS, block_size=0)
    with pytest.raises(ValueError, match="Namespace.layout_version=-1"):
        replace(NS, layout_version=-1)
