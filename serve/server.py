"""Running the app under uvicorn with a graceful drain: on SIGTERM (or Ctrl-C) readiness goes 503 and new
work is refused, queued and running requests finish (up to the drain timeout), then the process exits 0.
A second signal exits at once."""

from __future__ import annotations

import threading
import time

import uvicorn

from sagrt.serve.app import create_app
from sagrt.serve.config import ServeConfigError
from sagrt.serve.service import Service


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_started = False

    def handle_exit(self, sig, frame):
        if self.drain_started:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.drain_started = True
        self.service.drain()
        threading.Thread(target=self._drain, name="sagrt-drain", daemon=True).start()

    def _drain(self):
        deadline = time.monotonic() + self.service.config.drain_timeout
        while time.monotonic() < deadline and not self.service.idle:
            time.sleep(0.05)
        self.should_exit = True


def check_port(host: str, port: int) -> None:
    """Refuses a port another process holds before the model loads (uvicorn would find out after)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServeConfigError(f"cannot listen on {host}:{port} ({err.strerror}): pass another --port or "
                                   f"--host") from None


def serve(config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    check_port(host, port)
    service = Service(config)
    app = create_app(config, service)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=5), service)
    server.run()
    return 0


__all__ = ["DrainingServer", "serve"]
