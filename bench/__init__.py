"""`sagrt bench`: sagrt backends side by side with eager diffusers' StableDiffusionSAGPipeline.

Every (backend, size) is measured in a fresh Python process (`python -m sagrt.bench CASE OUT`),
so its peak RSS is its own and not the high-water mark of whatever ran before it. In that process:
load (untimed; the parent has loaded each engine backend once before in a process of its own, so exports and
engine builds are done and cached), reset the peak-memory counters, `warmup` untimed runs; then the timed runs,
made on the parent's word so that the baseline and every backend take turns run by run (each timed run of one
is next to one of the others in time: this project's VM has slow periods of seconds to minutes, which a
backend measured all at once could fall into alone): `repeats` SAG runs alternating with `cfg_repeats` runs
with sag_scale=0 (CFG only) for the SAG overhead. Per-run numbers are reduced by the median. A step is the
denoising loop's time (first UNet call to the callback after the last scheduler step) over its iterations;
loop overhead is that time minus the UNet calls, over it.

Stage times come from a timing proxy around the runners (sagrt) or forward hooks on the modules
(diffusers); both synchronise CUDA before reading the clock, so a call's time is its own.

Modules: config (what is measured), machine (where), timing (stage clocks), measure (one worker's runs),
worker (the subprocess protocol), run (the parent, ratios), report (Markdown).
"""

from sagrt.bench.config import BASELINE, PROMPT, BenchConfig, BenchError, parse_sizes
from sagrt.bench.report import markdown
from sagrt.bench.run import run_bench

__all__ = ["BASELINE", "PROMPT", "BenchConfig", "BenchError", "markdown", "parse_sizes", "run_bench"]
