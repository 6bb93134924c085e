"""The model backends by name, and the choice of one for a model (`make_backend`)."""

from __future__ import annotations

from ..cache.manager import KVCacheManager
from ..model.loaded import LoadedModel
from .backend import ModelBackend
from .hf_backend import HFGenerateBackend
from .paged_backend import PagedLlamaBackend
from .scheduler_config import SchedulerConfig

#: In order of preference: `make_backend(None, ...)` takes the first that supports the model.
BACKENDS: dict[str, type[ModelBackend]] = {
    PagedLlamaBackend.name: PagedLlamaBackend,
    HFGenerateBackend.name: HFGenerateBackend,
}


def register_backend(backend: type[ModelBackend]) -> None:
    """Adds a backend (after the built-in ones in preference order); ValueError if its name is taken."""
    if backend.name in BACKENDS:
        raise ValueError(f"a model backend named {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend


def make_backend(
    name: str | None, loaded: LoadedModel, cache: KVCacheManager, config: SchedulerConfig
) -> ModelBackend:
    """The backend `name` (ValueError naming the valid ones, or why it cannot serve the model), or with None
    the first registered backend that supports the model."""
    if name is not None:
        backend = BACKENDS.get(name)
        if backend is None:
            raise ValueError(f"unknown model backend {name!r}; expected one of: {', '.join(BACKENDS)}")
        reason = backend.unsupported(loaded, cache)
        if reason is not None:
            raise ValueError(f"model backend {name!r} cannot serve {loaded.model_id!r}: {reason}")
        return backend.create(loaded, cache, config)
    reasons: list[str] = []
    for backend in BACKENDS.values():
        reason = backend.unsupported(loaded, cache)
        if reason is None:
            return backend.create(loaded, cache, config)
        reasons.append(f"{backend.name}: {reason}")
    raise ValueError(f"no model backend supports {loaded.model_id!r}: {'; '.join(reasons)}")
