"""Stage timing for the SAG loop without a host synchronisation per step.

On CUDA, each mark records an event on the current stream and the durations are read after one
synchronisation at the end, so the host keeps enqueueing the next step while the GPU runs this one (a
per-step `torch.cuda.synchronize` would drain the queue every step). On the CPU the work is synchronous
and a mark reads the host clock.
"""

from __future__ import annotations

import time

import torch


class StageClock:
    """Marks points of one run; `durations()` gives the seconds between consecutive marks, by label.
    `sync_every_mark` brings back a host synchronisation at every mark (to measure what it costs)."""

    def __init__(self, device: torch.device, sync_every_mark: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.sync_every_mark = torch.device(device), sync_every_mark
        self.marks: list[tuple[str, object]] = []

    def mark(self, label: str) -> None:
        """Ends the stage `label` (the first mark only starts the clock)."""
        if not self.cuda:
            self.marks.append((label, time.perf_counter()))
            return
        if self.sync_every_mark:
            torch.cuda.synchronize(self.device)
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self.marks.append((label, event))

    def durations(self) -> list[tuple[str, float]]:
        """(label, seconds since the previous mark) for every mark after the first; on CUDA this waits once for
        the last mark."""
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1][1].synchronize()
            return [(label, start.elapsed_time(end) / 1e3)
                    for (_, start), (label, end) in zip(self.marks, self.marks[1:])]
        return [(label, end - start) for (_, start), (label, end) in zip(self.marks, self.marks[1:])]
