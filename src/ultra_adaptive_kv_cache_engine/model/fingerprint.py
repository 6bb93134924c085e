"""Weights fingerprints: SHA-256 digests naming exactly which weights produced a block of KV.

A fingerprint of weight files hashes, for each file in name order, its name, its size and its bytes. Hashing
half a gigabyte takes about half a second, so the result is recorded in a small JSON file next to the
weights (or in the model cache folder for read-only user folders) together with each file's size and
mtime; the record is trusted only while those still match, otherwise the digest is computed again.
Records are written crash-safe (temporary name, fsync, rename). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

RECORD_VERSION = 1
_CHUNK = 8 << 20


def weight_files(folder: Path) -> list[Path]:
    """The `*.safetensors` files of a model folder, in name order (ValueError when there are none)."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise ValueError(f"model folder {str(folder)!r} holds no *.safetensors weight files")
    return files


def files_fingerprint(files: Sequence[Path]) -> str:
    """SHA-256 hex digest over each file's name, size and content, in the order given."""
    digest = hashlib.sha256(b"uakv-weights-v1")
    for path in files:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def state_dict_fingerprint(model: nn.Module) -> str:
    """SHA-256 hex digest over a module's parameters and buffers (name, dtype, shape, bytes), name order."""
    digest = hashlib.sha256(b"uakv-state-dict-v1")
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\0{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stat_entries(files: Sequence[Path]) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for path in files:
        stat = path.stat()
        entries.append({"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return entries


def write_json_atomic(path: Path, payload: dict[str, object]) -> None:
    """Write `payload` as JSON to `path` crash-safe: a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, sort_keys=True, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_record(record: Path) -> dict[str, object] | None:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cached_files_fingerprint(files: Sequence[Path], record: Path) -> str:
    """`files_fingerprint(files)`, reusing `record` while names, sizes and mtimes match, refreshing it otherwise.

    A record that cannot be written (read-only place) is not an error: the digest is returned anyway.
    """
    entries = _stat_entries(files)
    data = _read_record(record)
    if (
        data is not None
        and data.get("version") == RECORD_VERSION
        and data.get("files") == entries
        and isinstance(data.get("sha256"), str)
    ):
        return str(data["sha256"])
    digest = files_fingerprint(files)
    try:
        write_json_atomic(record, {"version": RECORD_VERSION, "files": entries, "sha256": digest})
    except OSError:
        pass
    return digest


def record_path_for(folder: Path, records_dir: Path) -> Path:
    """Where the fingerprint record of a user model folder lives: named by a digest of its resolved path."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return records_dir / f"{key}.json"
