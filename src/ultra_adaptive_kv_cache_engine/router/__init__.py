"""`uakv route`: a KV-aware router in front of N `uakv serve` instances (same OpenAI API, streams passed
through), sending each request where its prompt prefix is believed cached, balanced against load."""

from .config import RouterConfig

__all__ = ["RouterConfig", "create_router_app"]


def __getattr__(name: str) -> object:
    if name == "create_router_app":  # lazy: no Starlette or httpx import until the app is built
        from .app import create_router_app

        return create_router_app
    raise AttributeError(name)
