"""Durable snapshots of the seed's content-addressed tensor store: one safetensors file, crash-safe.

The file holds one tensor per entry, named by the hex digest of its key, with metadata naming the format,
its version, the tenant salt's digest, each entry's stamp (the snapshot write it came from, see
`shared_snapshot.py`) and a SHA-256 checksum over every (name, stamp, dtype, shape, bytes). It is written under
a temporary name, fsynced, renamed over the old snapshot and its folder fsynced, so a crash leaves either the
old or the new snapshot, never a torn one; a reader reads the file once, so a rename during the read cannot
mix two versions. Version 1 files (no stamps) are still read: all their entries get one stamp derived from
the file's checksum. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .keys import tensor_bytes

FORMAT = "uakv-tensor-store"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
TEMP_SUFFIX = ".tmp"


class SnapshotError(ValueError):
    """A snapshot file is not one of ours, was written for another tenant, or does not match its checksum."""


def snapshot_path(folder: Path, tenant_salt: str) -> Path:
    tenant = hashlib.sha256(tenant_salt.encode()).hexdigest()[:16]
    return folder / f"tensor-store-{tenant}.safetensors"


def _checksum(entries: Mapping[str, torch.Tensor], stamps: Mapping[str, str] | None) -> str:
    h = hashlib.sha256()
    for name in sorted(entries):
        t = entries[name]
        stamp = f"{stamps[name]}|" if stamps is not None else ""
        h.update(f"{name}|{stamp}{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _tenant(tenant_salt: str) -> str:
    return hashlib.sha256(tenant_salt.encode()).hexdigest()


def save_snapshot(path: Path, entries: Mapping[bytes, torch.Tensor], stamps: Mapping[bytes, str],
                  tenant_salt: str) -> int:
    """Atomically write `entries` (key digest -> value) with their `stamps` to `path`; returns the bytes
    written. One writer at a time per path (the caller holds the folder's lock)."""
    named = {digest.hex(): value.detach().cpu().contiguous() for digest, value in entries.items()}
    named_stamps = {digest.hex(): stamps[digest] for digest in entries}
    metadata = {"format": FORMAT, "version": VERSION, "checksum": _checksum(named, named_stamps),
                "tenant": _tenant(tenant_salt), "stamps": json.dumps(named_stamps, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
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


def remove_stale_temps(path: Path) -> int:
    """Delete temporary files that writers of `path` killed mid-write left behind; returns how many. Only
    safe while holding the folder's lock (no writer is then mid-write)."""
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def remove_orphan_temps(path: Path) -> int:
    """Delete temporary files of `path` whose writer process is gone (their name carries its pid); safe without
    the folder's lock, so it runs when an engine opens the folder. Returns how many were removed."""
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 2 : -len(TEMP_SUFFIX)]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _metadata(data: bytes, name: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (header: 8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise SnapshotError(f"snapshot {name} is {len(data)} bytes long; too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise SnapshotError(f"snapshot {name} announces a {size}-byte header in a {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise SnapshotError(f"snapshot {name} has an unreadable header: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _stamps(metadata: dict[str, str], named: Mapping[str, torch.Tensor], name: str) -> dict[str, str]:
    if metadata.get("version") == "1":
        stamp = f"v1-{metadata.get('checksum', '')[:16]}"
        return dict.fromkeys(named, stamp)
    try:
        stamps = json.loads(metadata.get("stamps", ""))
    except ValueError as exc:
        raise SnapshotError(f"snapshot {name} has unreadable stamps: {exc}") from exc
    if not isinstance(stamps, dict) or set(stamps) != set(named) or not all(
        isinstance(s, str) for s in stamps.values()
    ):
        raise SnapshotError(f"snapshot {name} has stamps that do not match its entries")
    return stamps


def load_snapshot(path: Path, tenant_salt: str) -> tuple[dict[bytes, torch.Tensor], dict[bytes, str]]:
    """The entries (key digest -> value) and stamps (key digest -> stamp) of the snapshot at `path` (both {}
    if there is none); SnapshotError if it cannot be trusted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, {}
    except OSError as exc:
        raise SnapshotError(f"snapshot {path.name} is unreadable: {exc}") from exc
    metadata = _metadata(data, path.name)
    try:
        named = load(data)
    except (SafetensorError, ValueError) as exc:
        raise SnapshotError(f"snapshot {path.name} is unreadable: {exc}") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") not in READABLE_VERSIONS:
        raise SnapshotError(f"snapshot {path.name} has format {metadata.get('format')!r} "
                            f"version {metadata.get('version')!r}; expected {FORMAT!r} version "
                            f"{' or '.join(READABLE_VERSIONS)}")
    if metadata.get("tenant") != _tenant(tenant_salt):
        raise SnapshotError(f"snapshot {path.name} belongs to another tenant")
    stamps = _stamps(metadata, named, path.name)
    if metadata.get("checksum") != _checksum(named, stamps if metadata.get("version") != "1" else None):
        raise SnapshotError(f"snapshot {path.name} does not match its checksum")
    try:
        return ({bytes.fromhex(n): t for n, t in named.items()}, {bytes.fromhex(n): s for n, s in stamps.items()})
    except ValueError as exc:
        raise SnapshotError(f"snapshot {path.name} has an entry name that is not a hex digest") from exc
