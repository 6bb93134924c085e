"""Namespaces of a cache manager's blocks: the default one, and the check that a namespace fits a pool."""

from __future__ import annotations

from ..config import KVCacheConfig
from ..memory import LAYOUT_VERSION, KVSpec
from ..prefix import Namespace
from .tier_list import namespace_codec


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
    """TypeError/ValueError unless `namespace` describes blocks of `spec` (block size, dtype, layout version)."""
    if not isinstance(namespace, Namespace):
        raise TypeError(f"namespace={namespace!r} must be a Namespace")
    dtype_name = str(spec.dtype).removeprefix("torch.")
    expected = {"block_size": spec.block_size, "dtype": dtype_name, "layout_version": LAYOUT_VERSION}
    for field, value in expected.items():
        if getattr(namespace, field) != value:
            raise ValueError(f"namespace.{field}={getattr(namespace, field)!r} must be {value!r} for this pool")
