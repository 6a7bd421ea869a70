"""One worker's job: load one pipeline (diffusers' eager baseline or a sagrt backend), time its runs, reduce them."""

from __future__ import annotations

import statistics
import time
import warnings
from collections import Counter
from contextlib import ExitStack

import torch
from diffusers import StableDiffusionSAGPipeline

from sagrt.bench.config import BASELINE, BenchError, parse_backend_spec
from sagrt.bench.machine import peak_rss_mb, reset_peak_rss
from sagrt.bench.timing import CallLog, TimedRunners, module_timing
from sagrt.export.models import load_model
from sagrt.networks import PRECISIONS
from sagrt.runtime.backends import default_device
from sagrt.runtime.pipeline import SAGPipeline
from sagrt.runtime.schedulers import make_scheduler, uses_sigmas


def load_diffusers(case: dict, log: CallLog):
    """The baseline: diffusers' StableDiffusionSAGPipeline, eager, on the same modules sagrt loads."""
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
    pipe.to(device, PRECISIONS[case["baseline_precision"]])
    vae = components.vae
    vae_first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    hooks = [module_timing(log, "text", components.text_encoder, components.text_encoder),
             module_timing(log, "unet", components.unet, components.unet),
             module_timing(log, "vae", vae_first, vae.decoder)]
    return pipe, device, hooks


def load_sagrt(case: dict, log: CallLog):
    name, precision = parse_backend_spec(case["backend"])
    pipe = SAGPipeline.from_pretrained(case["model"], backend=name, scheduler=case["scheduler"],
                                       device=case["device"], precision=precision, safety_checker=False)
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
