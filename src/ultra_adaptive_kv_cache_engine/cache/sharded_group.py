"""`ShardGroup`: the ranks of one tensor-parallel group and the few collectives the sharded cache needs.

Every collective goes through `torch.distributed` (gloo on CPU, NCCL on CUDA; no other transport). Rank r
holds the contiguous slice ``kv_head_range(H)`` of the H KV heads, the slice transformers' column-wise plan
gives it (k_proj / v_proj outputs split in `degree` equal chunks, in rank order).

Invariants:
- Every rank calls the same collectives in the same order; the sharded cache guarantees it by running the
  same deterministic bookkeeping on the same token ids on every rank (decisions that need I/O are taken on
  rank 0 and broadcast).
- A collective that fails (a peer died, or did not answer within the group's timeout, set at
  `init_process_group`) raises `RankFailureError` naming the rank and the operation; ranks that disagree
  (`check_agree`) raise `RankDivergenceError`. Nothing waits forever.
- Degree 1 needs no process group: every collective is local.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.distributed as dist

BACKENDS: dict[str, str] = {"cpu": "gloo", "cuda": "nccl"}
"""Device type -> torch.distributed backend."""

EXIT_GROUP_BROKE = 3
"""Exit code of a rank that stops because its group broke (a follower of the failure, not its cause)."""


def exit_after_group_failure(code: int = EXIT_GROUP_BROKE) -> NoReturn:
    """Ends this process now, flushing stdout and stderr but running no destructors: a process group whose
    peer died cannot be torn down cleanly (its destructor may abort). Close your own files and tiers first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RankFailureError(RuntimeError):
    """The tensor-parallel group broke: a peer rank died or did not answer in time. Stop every rank."""


class RankDivergenceError(RankFailureError):
    """Ranks that must agree (same request, same block tables) do not."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


_TRANSPORT_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "process group", "socket")


def _is_transport_failure(exc: RuntimeError) -> bool:
    """True for torch.distributed's own errors and for the plain RuntimeErrors its backends raise (gloo
    raises them with its source path in the message: "Connection closed by peer", "Timed out waiting")."""
    if isinstance(exc, dist.DistError):
        return True
    message = str(exc).lower()
    return any(word in message for word in _TRANSPORT_WORDS)


@dataclass(frozen=True)
class ShardGroup:
    """Rank `rank` of `degree` ranks; collective tensors live on `device` (CPU for gloo, CUDA for NCCL).

    `process_group` None means torch.distributed's default group (unused at degree 1).
    """

    rank: int
    degree: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    process_group: Any = None

    def __post_init__(self) -> None:
        for name in ("rank", "degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ShardGroup.{name}={value!r} must be an integer")
        if self.degree < 1 or not 0 <= self.rank < self.degree:
            raise ValueError(f"ShardGroup(rank={self.rank}, degree={self.degree}): need 0 <= rank < degree")
        object.__setattr__(self, "device", torch.device(self.device))  # normalising the given value

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ShardGroup:
        """Degree 1: one rank, no process group."""
        return cls(0, 1, torch.device(device))

    @classmethod
    def from_environment(cls, device_type: str = "cpu", timeout_s: float = 60.0) -> ShardGroup:
        """The group that torchrun (or `RankLauncher`) describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*.

        Initialises the default process group (backend from `BACKENDS`, collectives failing after
        `timeout_s`) unless it exists already. WORLD_SIZE unset or 1 gives `single()`.
        """
        backend = BACKENDS.get(device_type)
        if backend is None:
            raise ValueError(f"device_type={device_type!r} has no backend; expected one of: {', '.join(BACKENDS)}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
        degree = _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", _env_int("RANK", 0))
        device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if degree == 1:
            return cls.single(device)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_first(self) -> bool:
        """True on rank 0, the rank that owns the tier store and takes the I/O decisions."""
        return self.rank == 0

    def kv_head_range(self, num_kv_heads: int) -> range:
        """The KV heads this rank holds: a contiguous slice of ``num_kv_heads / degree`` heads."""
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive integer")
        if num_kv_heads % self.degree:
            raise ValueError(
                f"{num_kv_heads} KV heads cannot be split over a tensor-parallel degree of {self.degree}; "
                "choose a degree that divides the number of KV heads"
            )
        per_rank = num_kv_heads // self.degree
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    # -- collectives ---------------------------------------------------------------------------------------
    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turns a failing collective inside the block into `RankFailureError` naming `what`; other errors
        (bad input, a model bug) pass through unchanged."""
        try:
            yield
        except RankFailureError:
            raise
        except RuntimeError as exc:
            if self.degree == 1 or not _is_transport_failure(exc):
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RankFailureError(
                f"tensor-parallel group of {self.degree} ranks broke during {what} on rank {self.rank}: "
                f"{first_line}. A peer rank died or did not answer within the group's timeout; stop every "
                "rank and start the group again (the persisted cache stays valid)"
            ) from exc

    def broadcast_ints(self, values: Sequence[int] | None) -> tuple[int, ...]:
        """Rank 0's `values` on every rank (other ranks pass None)."""
        if self.is_first == (values is None):
            raise ValueError(f"rank {self.rank}: values must be given on rank 0 only, got {values!r}")
        if self.degree == 1:
            return tuple(int(v) for v in values or ())
        with self.guard("broadcast"):
            length = torch.tensor([len(values) if values is not None else 0], dtype=torch.int64, device=self.device)
            dist.broadcast(length, 0, group=self.process_group)
            data = torch.empty(int(length.item()), dtype=torch.int64, device=self.device)
            if values is not None:
                data.copy_(torch.tensor(list(values), dtype=torch.int64))
            if data.numel():
                dist.broadcast(data, 0, group=self.process_group)
        return tuple(data.tolist())

    def gather_to_first(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape and dtype on all ranks), in rank order, on rank 0; None elsewhere."""
        if self.degree == 1:
            return [tensor]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.degree)] if self.is_first else None
        with self.guard("gather"):
            dist.gather(tensor, parts, dst=0, group=self.process_group)
        return parts

    def scatter_from_first(
        self, chunks: Sequence[torch.Tensor] | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Rank r receives rank 0's ``chunks[r]`` (each of `shape` and `dtype`); other ranks pass None."""
        if self.is_first == (chunks is None):
            raise ValueError(f"rank {self.rank}: chunks must be given on rank 0 only")
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
        if chunks is not None:
            if len(chunks) != self.degree:
                raise ValueError(f"{len(chunks)} chunks for a group of {self.degree} ranks")
            bad = [tuple(c.shape) for c in chunks if tuple(c.shape) != tuple(shape) or c.dtype != dtype]
            if bad:
                raise ValueError(f"chunks of shapes {bad} do not match {tuple(shape)} {dtype}")
        if self.degree == 1:
            assert chunks is not None
            return out.copy_(chunks[0])
        scatter_list = [c.to(device).contiguous() for c in chunks] if chunks is not None else None
        with self.guard("scatter"):
            dist.scatter(out, scatter_list, src=0, group=self.process_group)
        return out

    def check_agree(self, payload: bytes, what: str) -> None:
        """RankDivergenceError unless every rank passed the same `payload` (compared by SHA-256)."""
        if self.degree == 1:
            return
        digest = torch.frombuffer(bytearray(hashlib.sha256(payload).digest()), dtype=torch.uint8).to(self.device)
        parts = [torch.empty_like(digest) for _ in range(self.degree)]
        with self.guard(f"the agreement check on {what}"):
            dist.all_gather(parts, digest, group=self.process_group)
        if any(not torch.equal(p, parts[0]) for p in parts):
            groups = sorted({bytes(p.cpu().tolist()).hex()[:12] for p in parts})
            raise RankDivergenceError(
                f"ranks of the tensor-parallel group disagree on {what} (rank {self.rank} sees digests "
                f"{[bytes(p.cpu().tolist()).hex()[:12] for p in parts]}; {len(groups)} distinct)"
            )
