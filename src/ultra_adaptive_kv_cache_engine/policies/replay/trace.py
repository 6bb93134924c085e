"""Request traces in the Mooncake JSONL schema: reading, validating and writing them.

Schema (one JSON object per line; blank lines are skipped; extra fields are ignored):

- ``timestamp``: arrival time in milliseconds (number >= 0); requests are replayed in file order;
- ``input_length``: prompt tokens (int >= 0);
- ``output_length``: generated tokens (int >= 0; carried, not used by the replay);
- ``hash_ids``: one id per block of the prompt (list of ints or strings). Ids are prefix-chained: block i's
  id names the whole prefix up to and including block i, so equal ids mean equal prefixes, and a request
  can only reuse block i if it also has blocks 0..i-1. Block i covers prompt tokens
  [i * block_tokens, min((i + 1) * block_tokens, input_length)); block_tokens is 512 for Mooncake traces.
  A list shorter than the prompt needs leaves the prompt's tail uncacheable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BlockId = int | str


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace. Invariant: lengths are non-negative ints, hash_ids a tuple of int/str."""

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[BlockId, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "input_length": self.input_length,
            "output_length": self.output_length,
            "hash_ids": list(self.hash_ids),
        }


def _count(obj: Mapping[str, Any], field: str, where: str) -> int:
    value = obj.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {field}={value!r} must be an integer >= 0")
    return value


def parse_request(obj: object, where: str = "request") -> TraceRequest:
    """A `TraceRequest` from one decoded JSON object; ValueError naming `where`, the field and the value."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    stamp = obj.get("timestamp")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or stamp < 0:
        raise ValueError(f"{where}: timestamp={stamp!r} must be a number of milliseconds >= 0")
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int | str) for i in ids):
        raise ValueError(f"{where}: hash_ids={ids!r} must be a list of integers or strings")
    return TraceRequest(
        timestamp=float(stamp),
        input_length=_count(obj, "input_length", where),
        output_length=_count(obj, "output_length", where),
        hash_ids=tuple(ids),
    )


def load_trace(path: str | os.PathLike[str]) -> list[TraceRequest]:
    """All requests of the JSONL trace at `path`, in file order.

    Raises FileNotFoundError for a missing file and ValueError naming the line for a malformed one.
    """
    path = Path(path)
    out: list[TraceRequest] = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            out.append(parse_request(obj, where))
    return out


def save_trace(requests: Iterable[TraceRequest], path: str | os.PathLike[str]) -> None:
    """Write `requests` as JSONL (the schema above) to `path`, through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for request in requests:
            fh.write(json.dumps(request.as_dict(), separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
