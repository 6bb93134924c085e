"""Running the server with uvicorn.

- `serve_command(kv_config, server_config)`: what `uakv serve` does. Loads the model, builds the engine,
  serves until SIGTERM or SIGINT, then shuts down gracefully: the listening socket closes (no new
  connections), in-flight requests finish (up to `drain_timeout_s`, streams included), the engine persists
  its cache when persistence is on, closes, and the command returns 0.
- `serve_main(argv)`: the same as `uakv serve` (`python -m ultra_adaptive_kv_cache_engine.server.run ...`).
- `BackgroundServer`: an app on a loopback port in a daemon thread (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import uvicorn

from ..config import KVCacheConfig
from ..metrics import LOGGER_NAME
from .config import ServerConfig

if TYPE_CHECKING:
    from ..model.loaded import LoadedModel

logger = logging.getLogger(LOGGER_NAME)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one (read it with getsockname)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def _signals_absorbed() -> Iterator[None]:
    """uvicorn handles SIGTERM/SIGINT while it serves (graceful shutdown), then re-raises the signal under the
    handler that was there before it; a no-op handler there lets the command persist, close and exit 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_server(app: Any, config: ServerConfig) -> None:
    """Serves `app` until SIGTERM or SIGINT, then drains (see the module docstring). Main thread only."""
    sock = bind_socket(config.host, config.port)
    if not config.is_loopback and config.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    uv = uvicorn.Config(app, timeout_graceful_shutdown=config.drain_timeout_s, log_level="info")  # type: ignore[arg-type]
    print(f"uakv serve: {app.state.service.model_name} on {_url(sock)}", file=sys.stderr, flush=True)
    with _signals_absorbed():
        uvicorn.Server(uv).run(sockets=[sock])
    sock.close()


def serve_command(kv_config: KVCacheConfig, server_config: ServerConfig, model: LoadedModel | None = None) -> int:
    """`uakv serve`: model, engine, server, graceful shutdown; returns 0 (see the module docstring). `model`: an
    already loaded model (default: the one `kv_config.model_path` names, loaded now)."""
    from ..engine.engine import UltraAdaptiveKVCacheEngine
    from ..engine.setup_thread import run_on_setup_thread
    from ..model.loader import load_model
    from .app import create_app

    def build() -> tuple[Any, Any]:
        loaded = model if model is not None else load_model(kv_config)
        built = UltraAdaptiveKVCacheEngine(kv_config, model=loaded)
        try:
            return built, create_app(built, server_config, loaded)
        except BaseException:
            built.close()
            raise

    # built on a thread of its own, which leaves the event loop's thread no OpenMP team (engine/setup_thread.py)
    engine, app = run_on_setup_thread(build)
    try:
        run_server(app, server_config)
        if kv_config.enable_persistence:
            print(f"uakv serve: persisted on shutdown: {engine.persist()}", file=sys.stderr, flush=True)
    finally:
        engine.close()
    print("uakv serve: stopped", file=sys.stderr, flush=True)
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """`uakv serve ARGS` (`python -m ultra_adaptive_kv_cache_engine.server.run ARGS`)."""
    from ..cli import main

    return main(["serve", *(sys.argv[1:] if argv is None else argv)])


class BackgroundServer:
    """`app` served on `host`:`port` (0: a free port) by uvicorn in a daemon thread:
    `with BackgroundServer(app) as server: ... server.url ...`. Leaving the block drains and stops it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, drain_timeout_s: float = 10.0,
                 start_timeout_s: float = 60.0) -> None:
        self.sock = bind_socket(host, port)
        self.url = _url(self.sock)
        config = uvicorn.Config(app, timeout_graceful_shutdown=drain_timeout_s,  # type: ignore[arg-type]
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.start_timeout_s = start_timeout_s
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uakv-server-{self.url}")

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    raise SystemExit(serve_main())
