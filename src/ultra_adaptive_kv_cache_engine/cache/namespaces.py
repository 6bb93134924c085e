"""Namespaces of a cache manager's blocks: the default one, and the check that a namespace fits a pool."""

from __future__ import annotations

from ..config import KVCacheConfig
from ..memory import LAYOUT_VERSION, KVSpec
from ..prefix import Namespace
from .tier_list import POOL_PREFIX, namespace_codec, pool_codec_prefix


def default_namespace(config: KVCacheConfig, spec: KVSpec) -> Namespace:
    """A namespace for a cache whose model identity is not given: blocks match only within it."""
    return Namespace(
        model_id="unspecified",
        weights_fingerprint="",
        tokenizer_id="",
        dtype=str(spec.dtype).removeprefix("torch."),
        block_size=spec.block_size,
        layout_version=LAYOUT_VERSION,
        codec=namespace_codec(config),
        tenant_salt=config.tenant_salt,
    )


def check_namespace(namespace: Namespace, spec: KVSpec) -> None:
    """TypeError/ValueError unless `namespace` describes blocks of `spec` (block size, dtype, layout version,
    and the pool format at the head of its codec)."""
    if not isinstance(namespace, Namespace):
        raise TypeError(f"namespace={namespace!r} must be a Namespace")
    dtype_name = str(spec.dtype).removeprefix("torch.")
    expected = {"block_size": spec.block_size, "dtype": dtype_name, "layout_version": LAYOUT_VERSION}
    for field, value in expected.items():
        if getattr(namespace, field) != value:
            raise ValueError(f"namespace.{field}={getattr(namespace, field)!r} must be {value!r} for this pool")
    prefix = pool_codec_prefix(spec.pool_format)
    named = namespace.codec.startswith(POOL_PREFIX)
    if (prefix and not namespace.codec.startswith(prefix)) or (not prefix and named):
        want = f"start with {prefix!r}" if prefix else f"not start with {POOL_PREFIX!r}"
        raise ValueError(f"namespace.codec={namespace.codec!r} must {want} for a pool of format "
                         f"{spec.pool_format!r} (the namespace names the pool format)")
