"""`SchedulerConfig`: the sizes of the continuous-batching scheduler. Its defaults are `KVCacheConfig`'s (the one
place defaults live); `from_config` maps an engine's config onto it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import KVCacheConfig

_DEFAULTS = {f.name: f.default for f in fields(KVCacheConfig)}


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SchedulerConfig.{name}={value!r} must be a positive int")


@dataclass(frozen=True)
class SchedulerConfig:
    """How many requests run at once and how much work one step does.

    - `max_running`: sequences in the running batch (decoding or prefilling) at once.
    - `max_step_tokens`: tokens one step computes, decode tokens (one per running sequence) and prefill chunks
      together; a prompt longer than what is left of the budget is prefilled in chunks over several steps.
    - `max_waiting`: requests waiting for admission; one more raises `QueueFullError` (HTTP 429).
    - `admission_headroom`: the share of the pool's blocks that admission leaves free for the running
      sequences to grow into (fewer preemptions); 0 admits while any block fits.
    - `backend`: the model backend's name in `engine.backend_registry.BACKENDS` (None: the first registered
      one that supports the model).
    - `cuda_graphs`: replay decode steps from CUDA graphs on CUDA (one per padded batch size).
    """

    max_running: int = _DEFAULTS["max_running"]
    max_step_tokens: int = _DEFAULTS["max_step_tokens"]
    max_waiting: int = _DEFAULTS["max_waiting"]
    admission_headroom: float = 0.01
    backend: str | None = _DEFAULTS["model_backend"]
    cuda_graphs: bool = _DEFAULTS["cuda_graphs"]

    @classmethod
    def from_config(cls, config: KVCacheConfig) -> SchedulerConfig:
        """The scheduler an engine of `config` runs."""
        return cls(max_running=config.max_running, max_step_tokens=config.max_step_tokens,
                   max_waiting=config.max_waiting, backend=config.model_backend, cuda_graphs=config.cuda_graphs)

    def __post_init__(self) -> None:
        for name in ("max_running", "max_step_tokens", "max_waiting"):
            _positive(name, getattr(self, name))
        headroom = self.admission_headroom
        if isinstance(headroom, bool) or not isinstance(headroom, int | float) or not 0 <= headroom < 1:
            raise ValueError(f"SchedulerConfig.admission_headroom={headroom!r} must be a number in [0, 1)")
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(f"SchedulerConfig.backend={self.backend!r} must be a backend name or None")
