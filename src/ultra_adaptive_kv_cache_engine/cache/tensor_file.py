"""Durable snapshots of the seed's content-addressed tensor store: one safetensors file, crash-safe.

The file holds one tensor per entry, named by the hex digest of its key, with metadata naming the format,
its version, the tenant salt's digest and a SHA-256 checksum over every (name, dtype, shape, bytes). It is
written under a temporary name, fsynced, renamed over the old snapshot and its folder fsynced, so a crash
leaves either the old or the new snapshot, never a torn one. No pickle: safetensors only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .keys import tensor_bytes

FORMAT = "uakv-tensor-store"
VERSION = "1"


class SnapshotError(ValueError):
    """A snapshot file is not one of ours, was written for another tenant, or does not match its checksum."""


def snapshot_path(folder: Path, tenant_salt: str) -> Path:
    tenant = hashlib.sha256(tenant_salt.encode()).hexdigest()[:16]
    return folder / f"tensor-store-{tenant}.safetensors"


def _checksum(entries: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(entries):
        t = entries[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def save_snapshot(path: Path, entries: Mapping[bytes, torch.Tensor], tenant_salt: str) -> int:
    """Atomically write `entries` (key digest -> value) to `path`; returns the bytes written."""
    named = {digest.hex(): value.detach().cpu().contiguous() for digest, value in entries.items()}
    metadata = {"format": FORMAT, "version": VERSION, "checksum": _checksum(named),
                "tenant": hashlib.sha256(tenant_salt.encode()).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(named, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.stat().st_size


def load_snapshot(path: Path, tenant_salt: str) -> dict[bytes, torch.Tensor]:
    """The entries of the snapshot at `path` ({} if there is none); SnapshotError if it cannot be trusted."""
    if not path.exists():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        named = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {path.name} is unreadable: {exc}") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise SnapshotError(f"snapshot {path.name} has format {metadata.get('format')!r} "
                            f"version {metadata.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    if metadata.get("tenant") != hashlib.sha256(tenant_salt.encode()).hexdigest():
        raise SnapshotError(f"snapshot {path.name} belongs to another tenant")
    if metadata.get("checksum") != _checksum(named):
        raise SnapshotError(f"snapshot {path.name} does not match its checksum")
    try:
        return {bytes.fromhex(name): tensor for name, tensor in named.items()}
    except ValueError as exc:
        raise SnapshotError(f"snapshot {path.name} has an entry name that is not a hex digest") from exc
