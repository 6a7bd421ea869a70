"""What a `sagrt serve` process is configured with: one frozen dataclass, built by the CLI, shipped to Ray replicas."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from sagrt.errors import SagrtError


class ServeConfigError(SagrtError):
    """A `sagrt serve` option out of range."""


def parse_size(text: str, option: str = "--max-size") -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match:
        raise ServeConfigError(f"{option} {text!r} must be WIDTHxHEIGHT in pixels, e.g. 1024x1024")
    return int(match.group(1)), int(match.group(2))


def default_replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ServeConfig:
    """Model, limits and timings of one service process (every replica gets the same)."""

    model: str = "shapes"
    backend: str = "auto"
    safety_checker: bool = True
    sag_layer: str | None = None  # None: the pipeline's default layer
    backend_options: tuple[tuple[str, object], ...] = ()  # device, precision, export_dir... (runtime/backends.py)
    scheduler: str | None = None  # None: the model's own
    max_batch: int = 4  # images in one pipeline call
    max_queue: int = 64  # requests waiting for the engine
    timeout: float = 300.0  # seconds from arrival to answer, else 504
    max_size: tuple[int, int] = (1024, 1024)
    max_steps: int = 150
    max_images: int = 8  # images in one request
    max_body_bytes: int = 256 * 1024
    max_prompt_chars: int = 4000
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    warmup: bool = True
    replica: str = field(default_factory=default_replica_name)

    def __post_init__(self):
        checks = (("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 1),
                  ("--max-steps", self.max_steps, 1), ("--max-images", self.max_images, 1))
        for option, value, low in checks:
            if not isinstance(value, int) or value < low:
                raise ServeConfigError(f"{option} must be an integer >= {low}, got {value}")
        if not self.timeout > 0:
            raise ServeConfigError(f"--timeout must be positive seconds, got {self.timeout}")
        if min(self.max_size) < 8:
            raise ServeConfigError(f"--max-size {self.max_size[0]}x{self.max_size[1]} must be at least 8x8")
        if self.drain_timeout < 0:
            raise ServeConfigError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")

    def pipeline_kwargs(self) -> dict:
        """Arguments of SAGPipeline.from_pretrained for this model."""
        kwargs = dict(backend=self.backend, safety_checker=self.safety_checker, **dict(self.backend_options))
        if self.sag_layer is not None:
            kwargs["sag_layer"] = self.sag_layer
        return kwargs
