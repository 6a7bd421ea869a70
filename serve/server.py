"""Running the app under uvicorn with a graceful drain: on SIGTERM (or Ctrl-C) readiness goes 503 and new
work is refused, queued and running requests finish (up to the drain timeout), then the process exits 0.
A second signal exits at once."""

from __future__ import annotations

import signal
import threading
import time

import uvicorn

from sagrt.serve.app import create_app
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


def serve(config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    service = Service(config)
    app = create_app(config, service)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=5), service)
    server.run()
    return 0


__all__ = ["DrainingServer", "serve", "signal"]
