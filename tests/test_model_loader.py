"""Model loading, identity and tokenizers, on tiny real files (no network, no conversion)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from model_fixtures import tiny_model
from safetensors.torch import load_file

from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.convert import SOURCE_RECORD, ensure_converted
from ultra_adaptive_kv_cache_engine.model.fingerprint import (
    cached_files_fingerprint,
    files_fingerprint,
    state_dict_fingerprint,
)
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.loader import load_model, resolve_model_folder
from ultra_adaptive_kv_cache_engine.model.text import ByteTextCodec
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_lm() -> LoadedModel:
    return tiny_model()


def save_hf_folder(lm, folder: Path) -> Path:
    """A real Hugging Face folder: the tiny model's safetensors + config and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(200)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- tiny model --------------------------------------------------------------------------------------------
def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone(tiny_lm):
    state = torch.random.get_rng_state()
    again = build_tiny_llama(TinyLlamaSpec())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.weights_fingerprint == tiny_lm.weights_fingerprint
    assert build_tiny_llama(TinyLlamaSpec(seed=1)).weights_fingerprint != tiny_lm.weights_fingerprint
    assert tiny_lm.kv_shape.num_layers == 2 and tiny_lm.kv_shape.num_kv_heads == 2
    assert tiny_lm.kv_shape.head_dim == 16 and tiny_lm.max_context == 512


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"num_heads": 3}, "divide"), ({"vocab_size": 100}, "vocab_size"), ({"num_layers": 0}, "num_layers")],
)
def test_tiny_llama_spec_is_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        TinyLlamaSpec(**changes)


def test_namespace_names_model_weights_tokenizer_and_layout(tiny_lm):
    spec = tiny_lm.kv_spec(8)
    ns = tiny_lm.namespace(spec, tenant_salt="t1")
    assert (ns.model_id, ns.weights_fingerprint, ns.tokenizer_id) == (
        tiny_lm.model_id,
        tiny_lm.weights_fingerprint,
        ByteTextCodec().identity,
    )
    assert (ns.dtype, ns.block_size, ns.codec, ns.tenant_salt) == ("float32", 8, "identity", "t1")
    other = build_tiny_llama(TinyLlamaSpec(seed=3))
    assert other.namespace(other.kv_spec(8)).digest != tiny_lm.namespace(spec).digest
    with pytest.raises(ValueError, match="does not fit"):
        tiny_lm.namespace(build_tiny_llama(TinyLlamaSpec(num_layers=3)).kv_spec(8))


# -- text codecs -------------------------------------------------------------------------------------------
def test_byte_codec_round_trip_and_chat():
    codec = ByteTextCodec()
    ids = codec.encode("héllo")
    assert ids == [b + 3 for b in "héllo".encode()] and codec.decode(ids + [2, 0, 400]) == "héllo"
    chat = codec.chat([{"role": "user", "content": "x"}])
    assert chat == [1, *codec.encode("user: x"), 2, 1, *codec.encode("assistant: ")]
    with pytest.raises(TypeError, match="text must be a str"):
        codec.encode(b"raw")
    with pytest.raises(ValueError, match="messages"):
        codec.chat([])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        codec.chat([{"role": "user"}])


# -- fingerprints ------------------------------------------------------------------------------------------
def test_files_fingerprint_is_cached_while_files_are_unchanged(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x01" * 1000)
    record = tmp_path / "records" / "fp.json"
    digest = cached_files_fingerprint([weights], record)
    assert digest == files_fingerprint([weights]) and len(digest) == 64
    data = json.loads(record.read_text())
    data["sha256"] = "recorded"  # a valid record is trusted, not recomputed
    record.write_text(json.dumps(data))
    assert cached_files_fingerprint([weights], record) == "recorded"
    weights.write_bytes(b"\x02" * 1000)  # same size, new content and mtime
    os.utime(weights, ns=(1, 1))
    assert cached_files_fingerprint([weights], record) == files_fingerprint([weights]) != digest


def test_state_dict_fingerprint_sees_one_changed_weight(tiny_lm):
    model = build_tiny_llama(TinyLlamaSpec()).model
    before = state_dict_fingerprint(model)
    assert before == tiny_lm.weights_fingerprint
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    assert state_dict_fingerprint(model) != before


# -- resolving and loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["missing", "weights.bin", "empty_folder", "no_weights"])
def test_unknown_model_paths_raise_a_clear_error(tmp_path, name):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    config = KVCacheConfig(model_path=str(tmp_path / name), model_cache_dir=str(tmp_path / "models"))
    with pytest.raises(ValueError, match="model_path=|safetensors"):
        resolve_model_folder(config)


def test_load_a_hugging_face_folder_or_its_safetensors_file(tiny_lm, tmp_path):
    folder = save_hf_folder(tiny_lm, tmp_path / "tiny-hf")
    models_dir = tmp_path / "models"
    loaded = load_model(KVCacheConfig(model_path=str(folder), model_cache_dir=str(models_dir), device="cpu"))
    weights = sorted(folder.glob("*.safetensors"))
    assert loaded.weights_fingerprint == files_fingerprint(weights)
    assert len(list((models_dir / "fingerprints").glob("*.json"))) == 1  # the user folder stays untouched
    assert loaded.model_id == "tiny-hf" and loaded.dtype == torch.float32 and loaded.max_context == 512
    state = load_file(weights[0])
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[name])
    assert loaded.tokenizer.encode("w1 w7") == [5, 11] and loaded.tokenizer.decode([5, 11, 2]) == "w1 w7"
    via_file = load_model(KVCacheConfig(model_path=str(weights[0]), model_cache_dir=str(models_dir)))
    assert via_file.path == folder and via_file.weights_fingerprint == loaded.weights_fingerprint
    assert via_file.tokenizer_id == loaded.tokenizer_id != ByteTextCodec().identity


def test_a_folder_without_tokenizer_is_refused(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="cannot load"):
        load_model(KVCacheConfig(model_path=str(tmp_path / "bare"), model_cache_dir=str(tmp_path / "m")))


def test_a_complete_conversion_is_reused_and_a_failed_one_leaves_no_trace(tmp_path):
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"GGUF-not-really")
    models_dir = tmp_path / "models"
    target = models_dir / "toy"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"w")
    (target / SOURCE_RECORD).write_text(json.dumps({"name": "toy.gguf", "size": gguf.stat().st_size}))
    assert ensure_converted(gguf, models_dir) == target  # complete: no conversion attempted
    gguf.write_bytes(b"GGUF-changed-size")  # now stale: a conversion runs and fails on this fake file
    with pytest.raises(Exception):  # noqa: B017 - transformers' own parse error
        ensure_converted(gguf, models_dir)
    assert sorted(p.name for p in models_dir.iterdir()) == ["toy"]  # no temporary folder left
    assert (target / "model.safetensors").read_bytes() == b"w"  # the previous folder is intact
    with pytest.raises(ValueError, match="does not exist"):
        ensure_converted(tmp_path / "absent.gguf", models_dir)


def test_every_model_export_resolves():
    import ultra_adaptive_kv_cache_engine.model as model_pkg

    for name in model_pkg.__all__:
        assert getattr(model_pkg, name) is not None
    with pytest.raises(AttributeError, match="no attribute"):
        model_pkg.not_a_name  # noqa: B018
