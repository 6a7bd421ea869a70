"""The parent: one worker per (backend, size), taking turns run by run; rows with ratios against the baseline."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sagrt.bench.config import BASELINE, BenchConfig
from sagrt.bench.machine import environment
from sagrt.bench.measure import run_order
from sagrt.bench.worker import TURN_PAUSE_S, Worker
from sagrt.metrics import psnr_db, relative_error


def compare_with_baseline(measured: dict[str, dict], size: tuple[int, int], batch: int) -> list[dict]:
    """One row per backend (baseline first): its numbers, ratios to the baseline, parity with it."""
    base = measured[BASELINE]
    b = base["result"]
    rows = []
    for backend, payload in measured.items():
        r = payload["result"]
        row = dict(backend=backend, height=size[0], width=size[1], batch=batch,
                   latent_pixels=(size[0] // 8) * (size[1] // 8), **r)
        row.update(
            speedup_end_to_end=b["end_to_end_s"] / r["end_to_end_s"],
            speedup_step=b["step_ms"] / r["step_ms"],
            speedup_unet_2b=_ratio(b["unet_2b_ms"], r["unet_2b_ms"]),
            memory_ratio=r["peak_rss_mb"] / b["peak_rss_mb"],
            latents_relative_error=relative_error(payload["latents"], base["latents"]),
            image_psnr_db=None if math.isinf(psnr := psnr_db(payload["images"], base["images"])) else psnr,
            images_identical=bool(torch.equal(payload["images"], base["images"])),
        )
        rows.append(row)
    return rows


def _ratio(a, b):
    return None if a is None or b is None else a / b


def run_bench(config: BenchConfig, progress=print) -> dict:
    """Measures every size, the baseline and each backend taking turns run by run; returns the report (JSON-ready)."""
    env = environment(config.device)
    backends = (BASELINE, *config.backends)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sagrt-bench-") as tmp:
        for backend in config.backends:
            if backend != "torch":  # torch has no artifacts; the others export or build engines on first load
                progress(f"[prepare] {backend}: one untimed load in its own process, so that no measured process "
                         f"pays for (or keeps the memory of) an export or engine build")
                Worker(dict(config.case(backend, config.sizes[0]), load_only=True), Path(tmp)).finish()
        for k, size in enumerate(config.sizes, 1):
            progress(f"[{k}/{len(config.sizes)}] {size[0]}x{size[1]} batch {config.batch}, {config.steps} steps: "
                     f"{', '.join(backends)} each load and make {config.warmup} warm-up run(s) in their own "
                     f"process, then take turns, run by run, over {config.repeats} repeats")
            workers = {}
            try:
                for backend in backends:
                    workers[backend] = Worker(config.case(backend, size), Path(tmp))
                for sag in run_order(config.case(BASELINE, size)):
                    for worker in workers.values():
                        time.sleep(TURN_PAUSE_S)
                        worker.run(sag)
                measured = {backend: worker.finish() for backend, worker in workers.items()}
            finally:
                for worker in workers.values():
                    worker.kill()
            rows += compare_with_baseline(measured, size, config.batch)
    env["load_average_end"] = list(os.getloadavg())
    return dict(command=config.command(), config=asdict(config), environment=env, results=rows)
