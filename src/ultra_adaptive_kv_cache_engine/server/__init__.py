"""L5 server: `uakv serve`, an OpenAI-compatible HTTP server over the engine (see app.py). Names load on first
use, so importing the package does not import FastAPI or uvicorn."""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ServerConfig": ".config",
    "create_app": ".app",
    "BackgroundServer": ".run",
    "serve_command": ".run",
    "ServerMetrics": ".metrics",
    "APIError": ".errors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
