"""Stage timing: a proxy around sagrt's runners and forward hooks on diffusers' modules, both synchronising
CUDA before reading the clock, so that a call's time is its own."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sagrt.runners import Runners, RunnersProxy

@dataclass
class CallLog:
    """Every stage call of one pipeline run: (stage, batch, start, seconds), and the end of every step."""

    cuda: bool = False
    calls: list = field(default_factory=list)
    step_ends: list = field(default_factory=list)
    final_latents: torch.Tensor | None = None
    open: dict = field(default_factory=dict)

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.calls, self.step_ends, self.final_latents, self.open = [], [], None, {}

    def add(self, stage: str, batch: int, start: float) -> None:
        self.calls.append((stage, batch, start, self.clock() - start))

    def on_step(self, step: int, timestep, latents: torch.Tensor) -> None:
        """Pipeline callback (diffusers' signature, called after each scheduler step)."""
        self.step_ends.append(self.clock())
        self.final_latents = latents


class TimedRunners(RunnersProxy):
    """A timing proxy around any backend's runners: same three calls, each logged."""

    def __init__(self, inner: Runners, log: CallLog):
        super().__init__(inner)
        self.log = log

    def _timed(self, stage, batch, call, *args, **kwargs):
        start = self.log.clock()
        out = call(*args, **kwargs)
        self.log.add(stage, batch, start)
        return out

    def encode_text(self, input_ids, *args, **kwargs):
        return self._timed("text", input_ids.shape[0], self.inner.encode_text, input_ids, *args, **kwargs)

    def unet(self, sample, *args, **kwargs):
        return self._timed("unet", sample.shape[0], self.inner.unet, sample, *args, **kwargs)

    def decode(self, latents):
        return self._timed("vae", latents.shape[0], self.inner.decode, latents)


@contextmanager
def module_timing(log: CallLog, stage: str, first, last):
    """Logs each call of a stage that starts at module `first`'s forward and ends at `last`'s; hooks
    are removed on exit."""

    def started(module, args, kwargs):
        tensor = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        log.open[stage] = (tensor.shape[0], log.clock())

    def finished(module, args, output):
        batch, start = log.open.pop(stage)
        log.add(stage, batch, start)

    handles = [first.register_forward_pre_hook(started, with_kwargs=True), last.register_forward_hook(finished)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
