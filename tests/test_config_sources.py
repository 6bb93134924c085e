"""config_sources: every KVCacheConfig field from an option, a UAKV_* variable or a TOML file, exact values and
errors that name their source, precedence option > environment > file > default, TOML that reads back equal."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ultra_adaptive_kv_cache_engine.config import KVCacheConfig, TierConfig
from ultra_adaptive_kv_cache_engine.config_sources import (
    field_table,
    format_size,
    format_tiers,
    load_config,
    parse_bool,
    parse_float,
    parse_int,
    parse_size,
    parse_tiers,
    resolve_config,
    to_toml,
)
from ultra_adaptive_kv_cache_engine.types import CacheStrategy, CodecKind, DeviceKind, KVDType, TierKind

FIELDS = {f.name: f for f in field_table()}


def _raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


def _parse(name: str, text: str):
    return FIELDS[name].kind.parse(text)


@pytest.mark.parametrize("field", dataclasses.fields(KVCacheConfig), ids=lambda f: f.name)
def test_every_field_has_an_option_an_env_name_and_help(field):
    f = FIELDS[field.name]
    assert f.option == "--" + field.name.replace("_", "-")
    assert f.env == "UAKV_" + field.name.upper()
    assert f.help.strip(), f"KVCacheConfig.{field.name} has no metadata['help']"
    assert f.kind.parse(f.kind.format(f.default)) == f.default  # the default written as text reads back


def test_the_table_follows_the_dataclass():
    assert list(FIELDS) == [f.name for f in dataclasses.fields(KVCacheConfig)]
    assert {n for n, f in FIELDS.items() if f.kind.name == "bytes"} == {"cpu_tier_bytes", "disk_tier_bytes",
                                                                        "max_memory", "max_store_bytes"}
    assert {n: f.aliases for n, f in FIELDS.items() if f.aliases} == {
        "model_path": ("--model",), "cache_strategy": ("--strategy",), "enable_persistence": ("--persist",),
        "tenant_salt": ("--tenant",), "enable_profiling": ("--profile",)}


@pytest.mark.parametrize(("text", "value"), [
    ("1000", 1000), ("0", 0), ("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30), ("1.5GB", 1_500_000_000),
    (" 2 KiB ", 2048), ("1kb", 1000), ("3TB", 3 * 10**12), ("1TiB", 2**40), ("1.5KiB", 1536), ("7B", 7),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "match"), [
    ("lots", "'lots' is not a size in bytes; expected a number with an optional unit, such as 1000, 512MiB"),
    ("5 parsecs", "'5 parsecs' is not a size in bytes"),
    ("-1", "'-1' is not a size in bytes"),
    ("GiB", "'GiB' is not a size in bytes"),
    ("", "'' is not a size in bytes"),
    ("1.5B", "'1.5B' is 1.5 bytes; expected a whole number of bytes"),
])
def test_bad_sizes_name_the_value(text, match):
    with _raises(match):
        parse_size(text)


def test_size_format_reads_back():
    assert [format_size(v) for v in (0, 1000, 1536, 512 * 2**20, 4 * 2**30, 2**40)] == [
        "0", "1000", "1536", "512MiB", "4GiB", "1TiB"]


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("1", True), ("yes", True), ("ON", True), (" True ", True),
    ("false", False), ("0", False), ("no", False), ("Off", False),
])
def test_booleans(text, value):
    assert parse_bool(text) is value


def test_bad_scalars_name_the_value():
    with _raises("'maybe' is not a boolean; expected one of: true, 1, yes, on, false, 0, no, off"):
        parse_bool("maybe")
    with _raises("'4k' is not an integer; expected a whole number such as 4096"):
        parse_int("4k")
    with _raises("'half' is not a number; expected a decimal number such as 0.9"):
        parse_float("half")
    assert (parse_int(" 4096 "), parse_float("0.5")) == (4096, 0.5)


def test_enums_by_value_and_optional_none():
    assert _parse("device", "CUDA") is DeviceKind.CUDA
    assert _parse("cache_strategy", "s3fifo") is CacheStrategy.S3FIFO
    assert _parse("codec", "zstd") is CodecKind.ZSTD
    assert _parse("dtype", "bfloat16") is KVDType.BFLOAT16 and _parse("dtype", "None") is None
    assert _parse("max_memory", "none") is None and _parse("max_memory", "1GiB") == 2**30
    assert _parse("model_path", "none") is None and _parse("model_path", "/m") == "/m"
    assert _parse("tenant_salt", "none") == "none"  # not optional: the text itself
    with _raises("device='tpu' is not valid; expected one of: auto, cpu, cuda"):
        _parse("device", "tpu")
    with _raises("cache_strategy='mru' is not a known strategy; expected one of: "):
        _parse("cache_strategy", "mru")


def test_tier_list_syntax():
    assert parse_tiers("cpu:512MiB:lru,disk:4GiB:s3fifo:zstd,redis") == (
        TierConfig(TierKind.CPU, 512 * 2**20, "lru"), TierConfig(TierKind.DISK, 4 * 2**30, "s3fifo", CodecKind.ZSTD),
        TierConfig(TierKind.REDIS))
    assert parse_tiers("disk::lru, cpu:1GB::int8") == (
        TierConfig(TierKind.DISK, policy="lru"), TierConfig(TierKind.CPU, 10**9, codec=CodecKind.INT8))
    assert parse_tiers("") == () and _parse("tiers", "none") is None
    tiers = parse_tiers("cpu:1000,disk:4GiB::zstd,redis:512MiB:arc")
    assert format_tiers(tiers) == "cpu:1000,disk:4GiB::zstd,redis:512MiB:arc"
    assert parse_tiers(format_tiers(tiers)) == tiers


@pytest.mark.parametrize(("text", "match"), [
    ("cpu:1:lru:zstd:x", "tier 1 'cpu:1:lru:zstd:x' has 5 parts; expected KIND[:SIZE[:POLICY[:CODEC]]]"),
    ("cpu,gpu", "tier 2: tier kind='gpu' is not valid; expected one of: device, cpu, disk, redis"),
    ("cpu:lots", "'lots' is not a size in bytes"),
    ("cpu:0", "tier 1: capacity_bytes=0 is out of range"),
    ("disk:1:lru:int3", "tier 1: codec='int3' is not valid"),
    ("device", "tier 1: tier kind 'device' is the block pool itself"),
])
def test_bad_tier_lists_name_the_tier(text, match):
    with _raises(match):
        parse_tiers(text)


def test_precedence_flag_env_file_default(tmp_path):
    path = tmp_path / "uakv.toml"
    path.write_text("max_tokens = 100\n")
    env = {"UAKV_MAX_TOKENS": "200"}
    r = resolve_config({"max_tokens": "300"}, path, env)
    assert (r.config.max_tokens, r.sources["max_tokens"]) == (300, "flag --max-tokens")
    r = resolve_config({}, path, env)
    assert (r.config.max_tokens, r.sources["max_tokens"]) == (200, "env UAKV_MAX_TOKENS")
    r = resolve_config({}, path, {})
    assert (r.config.max_tokens, r.sources["max_tokens"]) == (100, f"file {path}")
    r = resolve_config({}, None, {})
    assert (r.config.max_tokens, r.sources["max_tokens"]) == (4096, "default")
    r = resolve_config({}, None, {}, defaults={"max_tokens": 50})  # a command's own default
    assert (r.config.max_tokens, r.sources["max_tokens"]) == (50, "default")
    assert load_config({"max_tokens": 7, "enable_metrics": False}, path, env) == KVCacheConfig(
        max_tokens=7, enable_metrics=False)  # typed values are taken as given


def test_toml_file_with_tier_tables(tmp_path):
    path = tmp_path / "uakv.toml"
    path.write_text('cache_strategy = "lru"\nmax_memory = "2GiB"\ncpu_tier_bytes = 1024\nenable_metrics = false\n'
                    'dtype = "float16"\nredis_url = "redis://127.0.0.1:6379/0"\n\n'
                    '[[tiers]]\nkind = "cpu"\ncapacity_bytes = "1GiB"\npolicy = "arc"\n\n'
                    '[[tiers]]\nkind = "disk"\ncodec = "zstd"\n\n[[tiers]]\nkind = "redis"\n')
    assert load_config({}, path, {}) == KVCacheConfig(
        cache_strategy=CacheStrategy.LRU, max_memory=2 * 2**30, cpu_tier_bytes=1024, enable_metrics=False,
        dtype=KVDType.FLOAT16, redis_url="redis://127.0.0.1:6379/0",
        tiers=(TierConfig(TierKind.CPU, 2**30, "arc"), TierConfig(TierKind.DISK, codec=CodecKind.ZSTD),
               TierConfig(TierKind.REDIS)))
    path.write_text('tiers = "cpu:1GiB,disk"\n')  # the compact syntax works in a file too
    assert load_config({}, path, {}).tiers == (TierConfig(TierKind.CPU, 2**30), TierConfig(TierKind.DISK))


@pytest.mark.parametrize(("text", "match"), [
    ("max_token = 3\n", "key max_token: unknown config field(s) ['max_token']; did you mean 'max_tokens'?"),
    ("[server]\nport = 1\n", "key server: unknown config field(s) ['server']; expected some of: max_tokens, "),
    ("max_tokens = 1.5\n", "key max_tokens: max_tokens=1.5 must be an integer"),
    ("max_tokens = \"many\"\n", "key max_tokens: 'many' is not an integer"),
    ("enable_persistence = 1\n", "key enable_persistence: enable_persistence=1 must be True or False"),
    ("[[tiers]]\nkind = \"cpu\"\nsize = 3\n", "key tiers: tier 1: unknown key(s) ['size']; expected the keys kind, "
                                              "capacity_bytes, policy, codec (kind required)"),
    ("[[tiers]]\npolicy = \"lru\"\n", "key tiers: tier 1: no kind"),
    ("tiers = 3\n", "key tiers: 3 is not a list of [[tiers]] tables"),
    ("max_tokens = \n", "not valid TOML"),
])
def test_bad_file_values_name_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with _raises(f"config file {path}"):
        load_config({}, path, {})
    with _raises(match):
        load_config({}, path, {})


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="config file /nonexistent/uakv.toml does not exist"):
        load_config({}, "/nonexistent/uakv.toml", {})


def test_bad_env_and_flag_values_name_their_source():
    with _raises("environment variable UAKV_BLOCK_SIZE: 'abc' is not an integer"):
        load_config({}, None, {"UAKV_BLOCK_SIZE": "abc"})
    with _raises("environment variable UAKV_BLOCK_SIZE: block_size=0 is out of range; expected an integer >= 1"):
        load_config({}, None, {"UAKV_BLOCK_SIZE": "0"})
    with _raises("environment variable UAKV_ENABLE_METRICS: 'nah' is not a boolean"):
        load_config({}, None, {"UAKV_ENABLE_METRICS": "nah"})
    with _raises("option --max-memory: 'lots' is not a size in bytes"):
        load_config({"max_memory": "lots"}, None, {})
    with _raises("option --redis-url: redis_url='http://x' must start with redis://"):
        load_config({"redis_url": "http://x"}, None, {})
    with _raises("option colour: unknown config field(s) ['colour']"):
        load_config({"colour": "red"}, None, {})


@pytest.mark.parametrize(("name", "target"), [
    ("UAKV_MAX_TOKEN", "UAKV_MAX_TOKENS"), ("UAKV_BLOCKSIZE", "UAKV_BLOCK_SIZE"),
    ("UAKV_STRATEGY", "UAKV_CACHE_STRATEGY"), ("UAKV_MODEL", "UAKV_MODEL_PATH"),
])
def test_typo_in_an_env_name_is_an_error(name, target):
    with _raises(f"environment variable {name}='1' is not a configuration variable; did you mean {target}?"):
        load_config({}, None, {name: "1"})


def test_a_callers_own_env_names_are_not_typos():
    with _raises("UAKV_MAX_TOKENS_X='8' is not a configuration variable; did you mean UAKV_MAX_TOKENS?"):
        load_config({}, None, {"UAKV_MAX_TOKENS_X": "8"})
    r = resolve_config({}, None, {"UAKV_MAX_TOKENS_X": "8"}, other_env={"UAKV_MAX_TOKENS_X"})
    assert r.config == KVCacheConfig()


def test_env_names_that_are_not_fields_are_left_alone():
    env = {"UAKV_CACHE_DIR": "/tmp/c", "UAKV_RESULTS_DIR": "/tmp/r", "UAKV_SOMETHING_ELSE": "x", "HOME": "/h",
           "UAKV_API_KEY": "k",
           "UAKV_CPU_TIER_BYTES": "1MiB", "UAKV_TIERS": "cpu:1MiB:lru,redis", "UAKV_DTYPE": "none"}
    r = resolve_config({}, None, env)
    assert r.config == KVCacheConfig(cpu_tier_bytes=2**20, tiers=parse_tiers("cpu:1MiB:lru,redis"))
    assert r.sources["tiers"] == "env UAKV_TIERS" and r.sources["dtype"] == "env UAKV_DTYPE"


def _round_trip(tmp_path, config: KVCacheConfig) -> KVCacheConfig:
    resolved = resolve_config({f.name: getattr(config, f.name) for f in field_table()}, None, {})
    path = tmp_path / "saved.toml"
    path.write_text(to_toml(resolved))
    return load_config({}, path, {})


@pytest.mark.parametrize("config", [
    KVCacheConfig(),
    KVCacheConfig(max_tokens=7, cache_strategy="arc", enable_persistence=True, persistence_path="/p q/\"x\"",
                  enable_profiling=True, block_size=32, dtype="bfloat16", device="cpu", reject_non_finite=False,
                  tenant_salt='a"b\\c\té\x01\x7f', cpu_tier_bytes=0, disk_tier_bytes=1536,
                  redis_url="redis://h:1/2?cluster=true", fsync_policy="always", disk_layout="segments",
                  codec="int4", tiers=parse_tiers("cpu:1000:lru,disk:4GiB:s3fifo:zstd,redis"), max_memory=10**9,
                  gpu_memory_utilization=0.25, enable_optimizer=False, enable_prefetcher=False,
                  enable_autoscaler=False, enable_metrics=False, model_path="m.gguf", model_cache_dir="/m",
                  max_new_tokens=9),
    KVCacheConfig(tiers=()),
], ids=["defaults", "every-field-changed", "no-tiers"])
def test_toml_output_reads_back_equal(tmp_path, config):
    assert _round_trip(tmp_path, config) == config


def test_toml_output_names_each_source(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text("block_size = 32\n")
    text = to_toml(resolve_config({"max_tokens": "12"}, path, {"UAKV_CODEC": "int8"}))
    lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line and not line.startswith("#")}
    assert lines["max_tokens"] == "max_tokens = 12  # flag --max-tokens"
    assert lines["codec"] == 'codec = "int8"  # env UAKV_CODEC'
    assert lines["block_size"] == f"block_size = 32  # file {path}"
    assert lines["cpu_tier_bytes"] == "cpu_tier_bytes = 536870912  # default (512MiB)"
    assert lines["tiers"] == 'tiers = "none"  # default' and lines["enable_metrics"] == "enable_metrics = true  # default"
    assert list(lines) == list(FIELDS)


def test_readme_lists_every_field_in_order():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("| field | default | meaning |"):]
    assert re.findall(r"^\| `(\w+)` \|", table, re.M) == list(FIELDS)


def test_uakv_config_never_prints_the_tier_secret():
    from ultra_adaptive_kv_cache_engine.config_sources import resolve_config, to_toml

    resolved = resolve_config({}, None, {"UAKV_TIER_SECRET": "s3cr3t-s3cr3t-s3cr3t"})
    assert resolved.config.tier_secret == "s3cr3t-s3cr3t-s3cr3t"
    text = to_toml(resolved)
    assert "s3cr3t" not in text and "# tier_secret = (secret, not shown)  # env UAKV_TIER_SECRET" in text
