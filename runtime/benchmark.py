"""sagrt backends side by side with eager diffusers' StableDiffusionSAGPipeline (the baseline users compare with).

Every (backend, size) is measured in a fresh Python process (`python -m sagrt.runtime.benchmark CASE OUT`),
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
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from sagrt.errors import SagrtError
from sagrt.runtime.backends import BACKENDS
from sagrt.runtime.metrics import psnr_db, relative_error
from sagrt.runtime.runners import Runners, RunnersProxy

BASELINE = "diffusers"
PROMPT = "a photo of an astronaut riding a horse"
VERSIONS = ("sagrt", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt",
            "numpy")


class BenchError(SagrtError):
    """A bench argument out of range, or a backend that could not be measured."""


# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """What `sagrt bench` measures: every backend plus the diffusers baseline at every size."""

    model: str = "tiny"
    backends: tuple[str, ...] = ("onnxruntime",)
    sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    steps: int = 20
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    cfg_repeats: int | None = None  # sag_scale=0 runs for the SAG overhead; None: as many as repeats
    guidance_scale: float = 7.5
    sag_scale: float = 0.75
    scheduler: str | None = None
    seed: int = 0
    prompt: str = PROMPT
    device: str | None = None

    def __post_init__(self):
        if not self.backends:
            raise BenchError("--backends is empty: name at least one of " + ", ".join(BACKENDS))
        for backend in self.backends:
            if backend not in BACKENDS:
                raise BenchError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)} "
                                 f"(the {BASELINE} baseline always runs)")
        if len(set(self.backends)) != len(self.backends):
            raise BenchError(f"--backends names a backend twice: {','.join(self.backends)}")
        for height, width in self.sizes:
            if height <= 0 or width <= 0 or height % 8 or width % 8:
                raise BenchError(f"size {height}x{width} must be positive multiples of 8, e.g. 64x64")
        for name, value, least in (("steps", self.steps, 1), ("batch", self.batch, 1), ("repeats", self.repeats, 1),
                                   ("warmup", self.warmup, 0), ("cfg-repeats", self.cfg_repeats or 0, 0)):
            if value < least:
                raise BenchError(f"--{name} must be >= {least}, got {value}")

    @property
    def cfg_runs(self) -> int:
        """How many sag_scale=0 runs measure the SAG overhead (none when SAG is off anyway)."""
        if self.sag_scale <= 0:
            return 0
        return self.repeats if self.cfg_repeats is None else self.cfg_repeats

    def command(self) -> str:
        """The `sagrt bench` command line that reproduces this measurement."""
        parts = ["sagrt", "bench", "--model", self.model, "--backends", ",".join(self.backends),
                 "--size", ",".join(f"{h}x{w}" for h, w in self.sizes), "--steps", str(self.steps),
                 "--batch", str(self.batch), "--repeats", str(self.repeats), "--warmup", str(self.warmup),
                 "--guidance-scale", f"{self.guidance_scale:g}", "--sag-scale", f"{self.sag_scale:g}",
                 "--seed", str(self.seed)]
        if self.cfg_repeats is not None:
            parts += ["--cfg-repeats", str(self.cfg_repeats)]
        if self.scheduler:
            parts += ["--scheduler", self.scheduler]
        if self.device:
            parts += ["--device", self.device]
        if self.prompt != PROMPT:
            parts += ["--prompt", self.prompt]
        return shlex.join(parts)

    def case(self, backend: str, size: tuple[int, int]) -> dict:
        """What one worker process measures."""
        case = asdict(self)
        del case["backends"], case["sizes"]
        return dict(case, backend=backend, height=size[0], width=size[1], cfg_runs=self.cfg_runs)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x64,128x96' -> ((64, 64), (128, 96))."""
    sizes = []
    for part in text.split(","):
        try:
            height, width = (int(side) for side in part.strip().lower().split("x"))
        except ValueError:
            raise BenchError(f"size {part!r} must be HxW in pixels, e.g. 64x64 or 512x512,768x512") from None
        sizes.append((height, width))
    return tuple(sizes)


# ---- the machine --------------------------------------------------------------------------------

def cpu_model() -> str:
    """lscpu's model name (what the results page calls the machine)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def environment(device: str | None = None) -> dict:
    """Date, machine, cores, load and package versions, recorded with every result."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=cpu_model(), cores=cores,
               torch_threads=torch.get_num_threads(), load_average=list(os.getloadavg()),
               platform=platform.platform(), versions=versions)
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ---- timing ------------------------------------------------------------------------------------

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


# ---- memory ------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark of this process to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


# ---- one worker: load one pipeline, time its runs ---------------------------------------------

def load_diffusers(case: dict, log: CallLog):
    """The baseline: diffusers' StableDiffusionSAGPipeline, eager, on the same modules sagrt loads."""
    from diffusers import StableDiffusionSAGPipeline

    from sagrt.export.models import load_model
    from sagrt.runtime.backends import default_device
    from sagrt.runtime.schedulers import make_scheduler, uses_sigmas

    components = load_model(case["model"], safety_checker=False)
    scheduler = components.scheduler
    if case["scheduler"]:
        scheduler = make_scheduler(case["scheduler"], scheduler.config)
    scheduler.set_timesteps(case["steps"])
    if uses_sigmas(scheduler):
        raise BenchError(f"the {BASELINE} baseline refuses {type(scheduler).__name__} (float timesteps): bench "
                         f"with an integer-timestep scheduler, e.g. --scheduler ddim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SAG pipeline is deprecated in diffusers
        pipe = StableDiffusionSAGPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                          tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    device = default_device(case["device"])
    pipe.to(device)
    vae = components.vae
    vae_first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    hooks = [module_timing(log, "text", components.text_encoder, components.text_encoder),
             module_timing(log, "unet", components.unet, components.unet),
             module_timing(log, "vae", vae_first, vae.decoder)]
    return pipe, device, hooks


def load_sagrt(case: dict, log: CallLog):
    from sagrt.runtime.pipeline import SAGPipeline

    pipe = SAGPipeline.from_pretrained(case["model"], backend=case["backend"], scheduler=case["scheduler"],
                                       device=case["device"], safety_checker=False)
    pipe.runners = TimedRunners(pipe.runners, log)
    return pipe, pipe.runners.device, []


def load(case: dict, log: CallLog):
    """(pipeline, device, timing hooks) for the case's backend."""
    return load_diffusers(case, log) if case["backend"] == BASELINE else load_sagrt(case, log)


def run_once(pipe, log: CallLog, case: dict, sag_scale: float):
    """One timed generation; returns (its numbers, final latents, images [B, H, W, 3] in [0, 1])."""
    log.reset()
    start = log.clock()
    images = pipe(prompt=case["prompt"], height=case["height"], width=case["width"],
                  num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], sag_scale=sag_scale,
                  num_images_per_prompt=case["batch"], generator=torch.Generator().manual_seed(case["seed"]),
                  output_type="np", callback=log.on_step, callback_steps=1).images
    total = log.clock() - start
    unet = [(batch, seconds, begin) for stage, batch, begin, seconds in log.calls if stage == "unet"]
    # the loop runs from the first UNet call to the callback after the last scheduler step
    loop = log.step_ends[-1] - min(begin for _, _, begin in unet)
    iterations = len(pipe.scheduler.timesteps)
    unet_total = sum(seconds for _, seconds, _ in unet)
    stage_total = lambda name: sum(s for stage, _, _, s in log.calls if stage == name)  # noqa: E731
    numbers = dict(total_s=total, step_s=loop / iterations, loop_s=loop, iterations=iterations, unet_s=unet_total,
                   loop_overhead=(loop - unet_total) / loop, text_s=stage_total("text"), vae_s=stage_total("vae"),
                   unet_calls=[(batch, seconds) for batch, seconds, _ in unet])
    return numbers, log.final_latents.detach().float().cpu().clone(), images


def median_call(runs: list[dict], batch: int) -> float | None:
    """Median seconds of the UNet calls at one batch size over all runs (None if there were none)."""
    calls = [seconds for run in runs for b, seconds in run["unet_calls"] if b == batch]
    return statistics.median(calls) if calls else None


def summarize(runs: list[dict], batch: int) -> dict:
    """Medians over the timed runs of one configuration."""
    med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    return dict(end_to_end_s=med("total_s"), images_per_s=batch / med("total_s"), step_ms=med("step_s") * 1e3,
                loop_overhead=med("loop_overhead"),
                unet_ms_per_step=med("unet_s") / runs[0]["iterations"] * 1e3, text_ms=med("text_s") * 1e3,
                vae_ms=med("vae_s") * 1e3, unet_2b_ms=_ms(median_call(runs, 2 * batch)),
                unet_b_ms=_ms(median_call(runs, batch)), iterations=runs[0]["iterations"],
                unet_calls_per_run={str(b): n for b, n in sorted(Counter(b for b, _ in runs[0]["unet_calls"]).items())},
                end_to_end_runs_s=[run["total_s"] for run in runs])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


class Measurement:
    """One (backend, size) in this process: loaded and warmed up when made; `run(sag)` times one generation
    (SAG, or CFG only); `finish()` returns the numbers, final latents and images."""

    def __init__(self, case: dict, progress=print):
        self.case, self.progress, self.log = case, progress, CallLog()
        load_start = time.perf_counter()
        self.pipe, self.device, hooks = load(case, self.log)
        self.pipe.set_progress_bar_config(disable=True)
        self.log.cuda = self.device.type == "cuda"
        self.load_s = time.perf_counter() - load_start
        self.load_peak = peak_rss_mb()
        self.run_scoped = reset_peak_rss()
        if self.log.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.label = f"  {case['backend']} {case['height']}x{case['width']}"
        self.hooks = ExitStack()
        for hook in hooks:
            self.hooks.enter_context(hook)
        self.sag_runs, self.cfg_runs, self.latents, self.images = [], [], None, None
        for i in range(case["warmup"]):
            numbers, _, _ = run_once(self.pipe, self.log, case, case["sag_scale"])
            progress(f"{self.label}: warm-up {i + 1}/{case['warmup']} {numbers['total_s']:.2f} s")

    def run(self, sag: bool) -> None:
        case = self.case
        numbers, latents, images = run_once(self.pipe, self.log, case, case["sag_scale"] if sag else 0.0)
        if sag:
            self.sag_runs.append(numbers)
            self.latents, self.images = latents, images
            self.progress(f"{self.label}: SAG run {len(self.sag_runs)}/{case['repeats']} {numbers['total_s']:.2f} s")
        else:
            self.cfg_runs.append(numbers)
            self.progress(f"{self.label}: sag_scale=0 run {len(self.cfg_runs)}/{case['cfg_runs']} "
                          f"{numbers['total_s']:.2f} s")

    def finish(self) -> dict:
        self.hooks.close()
        case = self.case
        result = summarize(self.sag_runs, case["batch"])
        if self.cfg_runs:
            cfg_step_ms = summarize(self.cfg_runs, case["batch"])["step_ms"]
            sag_overhead = result["step_ms"] / cfg_step_ms
        elif case["sag_scale"] <= 0:
            cfg_step_ms, sag_overhead = result["step_ms"], 1.0  # the runs are CFG-only already
        else:
            cfg_step_ms = sag_overhead = None  # not measured (--cfg-repeats 0)
        result.update(cfg_step_ms=cfg_step_ms, sag_overhead=sag_overhead, load_s=self.load_s,
                      peak_rss_mb=peak_rss_mb(), load_peak_rss_mb=self.load_peak,
                      rss_scope="runs (high-water reset after load)" if self.run_scoped else "process lifetime",
                      device=str(self.device))
        if self.log.cuda:
            result["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return dict(result=result, latents=self.latents, images=torch.from_numpy(self.images))


def run_order(case: dict) -> list[bool]:
    """The timed runs in the order they are made, SAG (True) and CFG-only (False) taking turns, so that the SAG
    overhead compares runs made in the same machine state (this project's VM has slow periods of seconds to
    minutes); the extra runs of either kind come last."""
    return [sag for i in range(max(case["repeats"], case["cfg_runs"]))
            for sag, count in ((True, case["repeats"]), (False, case["cfg_runs"])) if i < count]


READY = "sagrt-bench: ready"
# between two workers' runs, so that the process that just ran has wound down (its threads stop spinning) before
# the next one's timed run: without it, tiny onnxruntime runs took 80 ms instead of 73-75 ms
TURN_PAUSE_S = 0.2


def worker_main(case_path: str, out_path: str) -> int:
    """Entry point of the measuring subprocess: loads and warms up the case, prints READY, then makes one timed
    run per line it reads ("sag" or "cfg", answering READY after each) until "finish"; writes the results (or one
    error line)."""
    case = json.loads(Path(case_path).read_text())
    torch.set_grad_enabled(False)
    try:
        if case.get("load_only"):
            load(case, CallLog())
            payload = {}
        else:
            measurement = Measurement(case, progress=lambda line: print(line, file=sys.stderr, flush=True))
            print(READY, flush=True)
            for command in sys.stdin:
                if command.strip() == "finish":
                    break
                measurement.run(command.strip() == "sag")
                print(READY, flush=True)
            payload = measurement.finish()
    except (SagrtError, FileNotFoundError) as err:
        torch.save({"error": str(err).splitlines()[0] if str(err) else type(err).__name__}, out_path)
        return 2
    torch.save(payload, out_path)
    return 0


# ---- the parent: one worker per (backend, size), taking turns; ratios against the baseline --------

class Worker:
    """One case measured in a fresh Python process, driven run by run; its progress lines go to our stderr."""

    def __init__(self, case: dict, folder: Path):
        stem = f"{case['backend']}-{case['height']}x{case['width']}" + ("-load" if case.get("load_only") else "")
        self.case, case_path, self.out_path = case, folder / f"{stem}.json", folder / f"{stem}.pt"
        case_path.write_text(json.dumps(case))
        self.process = subprocess.Popen([sys.executable, "-m", "sagrt.runtime.benchmark", str(case_path),
                                         str(self.out_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not case.get("load_only"):
            self._wait_ready()

    def _wait_ready(self) -> None:
        for line in self.process.stdout:
            if line.strip() == READY:
                return
            sys.stderr.write(line)  # whatever a library printed
        self.finish()  # the worker ended instead: its error

    def run(self, sag: bool) -> None:
        try:
            self.process.stdin.write("sag\n" if sag else "cfg\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.finish()
        self._wait_ready()

    def finish(self) -> dict:
        """Ends the worker; its payload, or a BenchError with its error line."""
        try:
            self.process.stdin.write("finish\n")
            self.process.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        sys.stderr.write(self.process.stdout.read())
        code = self.process.wait()
        payload = torch.load(self.out_path, weights_only=False) if self.out_path.exists() else {}
        if code != 0 or "error" in payload:
            case = self.case
            raise BenchError(payload.get("error") or f"measuring {case['backend']} at {case['height']}x"
                             f"{case['width']} failed (worker exit status {code}; its traceback is above)")
        return payload

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def compare(measured: dict[str, dict], size: tuple[int, int], batch: int) -> list[dict]:
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
            rows += compare(measured, size, config.batch)
    env["load_average_end"] = list(os.getloadavg())
    return dict(command=config.command(), config=asdict(config), environment=env, results=rows)


# ---- tables ------------------------------------------------------------------------------------

def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


TIME_COLUMNS = ("size", "batch", "backend", "end-to-end s", "vs diffusers", "step ms", "UNet 2B ms", "UNet B ms",
                "text ms", "VAE ms")
COST_COLUMNS = ("size", "batch", "backend", "SAG overhead", "loop overhead", "peak RSS MB", "RSS vs diffusers",
                "latents rel. err", "PSNR dB")


def _table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def time_table(results: list[dict]) -> str:
    return _table(TIME_COLUMNS, [
        (f"{r['height']}x{r['width']}", str(r["batch"]), r["backend"], _fmt(r["end_to_end_s"], ".3f"),
         _fmt(r["speedup_end_to_end"], ".2f", "x"), _fmt(r["step_ms"], ".1f"), _fmt(r["unet_2b_ms"], ".1f"),
         _fmt(r["unet_b_ms"], ".1f"), _fmt(r["text_ms"], ".1f"), _fmt(r["vae_ms"], ".1f")) for r in results])


def cost_table(results: list[dict]) -> str:
    def parity(r):
        if r["backend"] == BASELINE:
            return "-", "-"
        return _fmt(r["latents_relative_error"], ".2e"), ("identical" if r["images_identical"]
                                                          else _fmt(r["image_psnr_db"], ".1f"))

    return _table(COST_COLUMNS, [
        (f"{r['height']}x{r['width']}", str(r["batch"]), r["backend"], _fmt(r["sag_overhead"], ".2f", "x"),
         _fmt(r["loop_overhead"] * 100, ".1f", "%"), _fmt(r["peak_rss_mb"], ".0f"), _fmt(r["memory_ratio"], ".2f", "x"),
         *parity(r)) for r in results])


def describe_environment(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items())
    load = " / ".join(f"{x:.2f}" for x in env["load_average"])
    lines = [f"- command: `{report['command']}`", f"- date: {env['date']}",
             f"- machine: {env['machine']}, {env['cores']} cores, torch threads {env['torch_threads']}"
             + (f", GPU {env['gpu']}" if "gpu" in env else ""),
             f"- load average at start (1/5/15 min): {load}", f"- versions: {versions}"]
    return "\n".join(lines)


def markdown(report: dict, title: str = "sagrt bench") -> str:
    """The whole report as Markdown: setup, then the time table and the overhead/memory/parity table."""
    return (f"## {title}\n\n{describe_environment(report)}\n\n{time_table(report['results'])}\n\n"
            f"{cost_table(report['results'])}\n")


if __name__ == "__main__":
    sys.exit(worker_main(*sys.argv[1:3]))
