"""The one script a first GPU run executes: it checks the TensorRT path end to end and writes one JSON.

    python benchmarks/gpu_check.py                       # tiny and sd15, under 10 minutes on one GPU

In order (each step is recorded as ran, failed or skipped with its reason; a failed step does not stop the
others; steps that would start past --budget-s are skipped, so the run ends in time):
  packages      versions, CUDA majors of torch and TensorRT, exactly one ONNX Runtime installed
  pytest -m gpu the GPU tests of the suite
  per preset (tiny, then sd15: the SD 1.5 architecture with seeded random weights, nothing downloaded):
    build       fp16 engines at the preset's size (static shapes, batch 1: the UNet runs at B=1 and 2B=2)
    parse fp16  the fp16 export parsed by TensorRT, with its I/O dtypes (attn_score must be FLOAT)
    load        GPU memory before and after loading, each engine's scratch size (profile maximum and in use)
    networks    each network against fp32 torch: relative errors, NaN/Inf counts, SAG mask agreement, VAE PSNR
    cuda graphs replay equal to plain execution; a capture broken on purpose falls back with equal outputs
    unet timing one UNet call at B and 2B, with and without CUDA graphs (CUDA events)
    end to end  512x512 (sd15) 50 steps against eager diffusers StableDiffusionSAGPipeline, fp16, same latents:
                seconds, PSNR, with and without a host sync per step, host syncs counted in one run
    close       GPU memory returned after close
    parse fp32  the fp32 export parsed likewise (last: for sd15 the largest export)
Every figure in the JSON was measured by this run; nothing is estimated. Bound (docs/design.md): fp16 engines vs
torch fp16, image PSNR >= 30 dB.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sagrt import __version__
from sagrt.engine.packages import cuda_major_mismatch, module_distributions, tensorrt_cuda_major
from sagrt.engine.precision import PSNR_BOUND_DB, compare_networks
from sagrt.engine.profiles import BuildConfig, Range
from sagrt.engine.tensorrt_build import cuda_missing, tensorrt_missing
from sagrt.export.artifacts import write_json_atomic
from sagrt.metrics import psnr_db as psnr
from sagrt.metrics import relative_error

SIZES = {"tiny": 64, "small": 256, "sd15": 512}  # each preset's own image size
PACKAGES = ("torch", "tensorrt", "onnx", "onnxruntime", "onnxruntime-gpu", "diffusers", "transformers", "polygraphy")


@dataclass
class Step:
    preset: str
    name: str
    status: str = "skipped"  # ran | skipped | failed
    reason: str | None = None
    seconds: float | None = None
    results: dict = field(default_factory=dict)


class Run:
    """The steps of one check, each run unless a requirement is missing or the time budget is spent."""

    def __init__(self, budget_s: float, report_path: str, header: dict):
        self.deadline = time.monotonic() + budget_s
        self.report_path, self.header = report_path, header
        self.steps: list[Step] = []

    def step(self, preset: str, name: str, missing: list[str | None], work) -> Step:
        step = Step(preset, name)
        self.steps.append(step)
        reasons = [reason for reason in missing if reason]
        if not reasons and time.monotonic() > self.deadline:
            reasons = ["the time budget (--budget-s) was spent"]
        if reasons:
            step.reason = "; ".join(reasons)
            print(f"[{preset}] {name}: skipped ({step.reason})", flush=True)
        else:
            print(f"[{preset}] {name} ...", flush=True)
            start = time.perf_counter()
            try:
                step.results = work() or {}
                step.status = "ran"
            except Exception as err:  # a failed step is reported and the others still run
                message = str(err).splitlines()[0] if str(err) else ""
                step.status, step.reason = "failed", f"{type(err).__name__}: {message}"
                traceback.print_exc()
            step.seconds = round(time.perf_counter() - start, 2)
            print(f"[{preset}] {name}: {step.status} in {step.seconds:.1f} s" +
                  (f" ({step.reason})" if step.reason else ""), flush=True)
        self.write()
        return step

    def write(self) -> None:
        """The JSON after every step, so a run cut short still leaves what it measured."""
        write_json_atomic(self.report_path, {**self.header, "steps": [asdict(s) for s in self.steps]}, default=str)


# ---- machine and packages ---------------------------------------------------------------------------------
def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def packages_step() -> dict:
    runtimes = module_distributions("onnxruntime")
    trt_major = tensorrt_cuda_major()
    return {"versions": versions(), "onnxruntime_distributions": runtimes, "one_onnxruntime": len(runtimes) == 1,
            "torch_cuda": torch.version.cuda, "tensorrt_distributions": module_distributions("tensorrt"),
            "tensorrt_cuda_major": trt_major, "cuda_major_mismatch": cuda_major_mismatch(trt_major, torch.version.cuda),
            "passed": len(runtimes) == 1 and cuda_major_mismatch(trt_major, torch.version.cuda) is None}


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "sagrt": __version__, "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}",
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except (ImportError, OSError):
        info["tensorrt"] = None
    return info


def run_gpu_tests() -> dict:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    return {"returncode": done.returncode, "summary": tail[-1] if tail else "", "tail": tail,
            "passed": done.returncode == 0}


# ---- GPU measurements ---------------------------------------------------------------------------------------
def gpu_memory() -> dict:
    free, total = torch.cuda.mem_get_info()
    return {"used_mib": round((total - free) / 2**20, 1), "torch_allocated_mib": round(torch.cuda.memory_allocated()
                                                                                       / 2**20, 1)}


def release_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def parse_export(preset: str, precision: str) -> dict:
    """The `precision` export of `preset` (sagrt's cache, shared with the build) parsed by TensorRT: the I/O
    dtypes of every network; attn_score must be FLOAT."""
    import tensorrt as trt

    from sagrt.engine.tensorrt_build import check_output_dtypes, network_io, parse_onnx
    from sagrt.export.onnx_export import export_model

    logger, results = trt.Logger(trt.Logger.WARNING), {}
    folder = export_model(preset, precision=precision, progress=False)
    for network in ("text_encoder", "unet", "vae_decoder"):
        builder, parsed, parser = parse_onnx(trt, logger, folder / f"{network}.onnx")
        results[network] = network_io(parsed)
        check_output_dtypes(network, results[network]["outputs"])  # raises unless attn_score is FLOAT
        del builder, parsed, parser
    return {"io": results, "attn_score": results["unet"]["outputs"]["attn_score"]}


def cuda_event_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` on the current stream, by CUDA events (warm-up first)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def unet_inputs(runners, size: int, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latent = size // runners.info.vae_scale_factor
    sample = torch.randn(batch, runners.info.in_channels, latent, latent, generator=gen).to("cuda", runners.dtype)
    context = torch.randn(batch, 77, runners.info.text_hidden_size, generator=gen).to("cuda", runners.dtype)
    return sample, torch.tensor(500, device="cuda"), context


def scratch_sizes(runners) -> dict:
    return {"shared_scratch_mib": round(runners.device_memory.size / 2**20, 2),
            "engines": {name: {"profile_max_mib": round(e.max_device_memory_size / 2**20, 2),
                               "in_use_mib": [round(b.memory_size / 2**20, 2) for b in e.bindings.values()],
                               "profiles": [b.profile for b in e.bindings.values()]}
                        for name, e in runners.engines.items()}}


def graph_checks(engine_dir: Path, size: int) -> dict:
    """CUDA graph replay against plain execution, and a capture broken on purpose (a device synchronisation
    while the stream captures) against plain execution."""
    from sagrt.engine.cuda_graphs import capture_graph
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    results = {}
    with TensorRTRunners(engine_dir, cuda_graph=False) as plain, TensorRTRunners(engine_dir) as graphed, \
            TensorRTRunners(engine_dir) as broken:
        broken.engines["unet"].capture = lambda enqueue, stream: capture_graph(
            lambda: (torch.cuda.synchronize(), enqueue())[1], stream)
        for batch in (1, 2):
            sample, t, context = unet_inputs(plain, size, batch)
            expected = plain.unet(sample, t, context)
            first, *replays = [graphed.unet(sample, t, context) for _ in range(4)]  # plain run, then replays
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fallback = [broken.unet(sample, t, context) for _ in range(2)]
            diff = lambda outs, ref: max(float((o[0] - ref[0]).abs().max()) for o in outs)  # noqa: E731
            results[f"batch_{batch}"] = {
                "graph_captured": all(b.graph is not None for b in graphed.engines["unet"].bindings.values()),
                "replay_vs_same_context_plain_max_abs_diff": diff(replays, first),  # same buffers, same tactics
                "replay_vs_other_runner_plain_max_abs_diff": diff(replays, expected),
                "replay_score_max_abs_diff": max(float((r[1] - first[1]).abs().max()) for r in replays),
                "fallback_warned": any("CUDA graph capture failed" in str(w.message) for w in caught),
                "fallback_graph_errors": [b.graph_error for b in broken.engines["unet"].bindings.values()],
                "fallback_vs_other_runner_plain_max_abs_diff": diff(fallback, expected),
                "fallback_relative_error": max(relative_error(o[0].float().cpu(), expected[0].float().cpu())
                                               for o in fallback)}
    torch.ones(1, device="cuda").sum().item()  # torch's CUDA state still works after the broken capture
    results["passed"] = all(r["graph_captured"] and r["replay_vs_same_context_plain_max_abs_diff"] == 0
                            and r["replay_score_max_abs_diff"] == 0 and r["fallback_warned"]
                            and r["fallback_relative_error"] <= 1e-3 for r in results.values())
    return results


def unet_timing(engine_dir: Path, size: int) -> dict:
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    results = {}
    for graphs in (True, False):
        with TensorRTRunners(engine_dir, cuda_graph=graphs) as runners:
            for batch in (1, 2):
                inputs = unet_inputs(runners, size, batch)
                results[f"{'graph' if graphs else 'plain'}_batch_{batch}_ms"] = cuda_event_ms(
                    lambda: runners.unet(*inputs))
    return results


def diffusers_sag(preset: str):
    """Eager diffusers StableDiffusionSAGPipeline over the preset's modules, fp16 on CUDA."""
    from diffusers import StableDiffusionSAGPipeline

    from sagrt.export.models import load_model

    c = load_model(preset, safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionSAGPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                          scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda", torch.float16)


def timed_runs(call, repeats: int) -> tuple[list[float], np.ndarray]:
    call()  # warm-up: CUDA graph capture, lazy initialisation
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        image = call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, image


def host_syncs(call) -> int:
    """Synchronising CUDA calls in one run (torch's sync debug mode warns on each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def end_to_end(preset: str, engine_dir: Path, size: int, args) -> dict:
    from sagrt.runtime import SAGPipeline

    latent = size // 8
    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(args.seed))
    kwargs = dict(prompt=args.prompt, height=size, width=size, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, sag_scale=args.sag_scale, output_type="np")
    results = {}
    eager = diffusers_sag(preset)
    times, reference = timed_runs(lambda: eager(latents=latents.to("cuda", torch.float16), **kwargs).images,
                                  args.repeats)
    results["diffusers_eager_fp16"] = {"seconds": times, "median_s": statistics.median(times)}
    eager = None  # its modules go before the engines load
    release_memory()
    pipe = SAGPipeline.from_pretrained(preset, backend="tensorrt", device="cuda", safety_checker=False,
                                       engine_dir=engine_dir)
    pipe.set_progress_bar_config(disable=True)
    for sync in (False, True):
        pipe.sync_every_step = sync
        times, image = timed_runs(lambda: pipe(latents=latents, **kwargs).images, args.repeats)
        results[f"sagrt_tensorrt_fp16{'_sync_every_step' if sync else ''}"] = {
            "seconds": times, "median_s": statistics.median(times),
            "step_ms_median": statistics.median(pipe.timings.steps) * 1e3}
    pipe.sync_every_step = False
    results["host_syncs_in_one_run"] = host_syncs(lambda: pipe(latents=latents, **kwargs))
    pipe.runners.close()
    value = psnr(image, reference)
    results.update(psnr_db=value, bound_db=PSNR_BOUND_DB, passed=value >= PSNR_BOUND_DB,
                   relative_error=relative_error(image, reference),
                   speedup=results["diffusers_eager_fp16"]["median_s"] / results["sagrt_tensorrt_fp16"]["median_s"])
    return results


def check_preset(preset: str, run: Run, args) -> None:
    from sagrt.engine.tensorrt_runner import TensorRTRunners
    from sagrt.runtime.torch_runners import TorchRunners

    size, work = SIZES[preset], Path(args.work_dir)  # engines in work; exports in sagrt's cache
    no_trt = "; ".join(tensorrt_missing()) or None
    state: dict = {}
    config = BuildConfig(precision="fp16", batch=Range(1, 1, 1), height=Range(size, size, size),
                         width=Range(size, size, size), static=True)

    def build():
        from sagrt.engine.tensorrt_build import build_for_model

        state["engine_dir"] = build_for_model(preset, config, work / f"{preset}-engines", force=args.rebuild,
                                              progress=False)
        return {"engine_dir": str(state["engine_dir"]), "build_config": config.to_dict(),
                "engine_mib": {p.name: round(p.stat().st_size / 2**20, 1)
                               for p in sorted(state["engine_dir"].glob("*.plan"))}}

    def load_and_compare():
        from sagrt.export.models import load_model

        release_memory()
        before = gpu_memory()
        runners = TensorRTRunners(state["engine_dir"])
        after_load = gpu_memory()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
        reference = TorchRunners(load_model(preset, safety_checker=False), device="cuda", dtype=torch.float32)
        report = compare_networks(runners, reference, runners.info, size, size, batch=1)
        scratch = scratch_sizes(runners)
        del reference
        release_memory()
        with_calls = gpu_memory()  # the engines with their contexts, buffers and scratch; the reference gone
        runners.close()
        del runners
        release_memory()
        closed = gpu_memory()
        passed = report["vae_decoder"]["passed"] and report["unet"]["nan"] == report["unet"]["inf"] == 0
        return {"memory": {"before_load": before, "after_load": after_load, "after_calls": with_calls,
                           "after_close": closed,
                           "not_returned_mib": round(closed["used_mib"] - before["used_mib"], 1)},
                "scratch": scratch, "networks": report, "passed": passed}

    def close_check():
        """After every step of the preset: what the GPU holds against the reading before the engines loaded."""
        release_memory()
        now, baseline = gpu_memory(), state["load"]["memory"]["before_load"]
        return {"before_load": baseline, "now": now,
                "not_returned_mib": round(now["used_mib"] - baseline["used_mib"], 1),
                "torch_allocated_returned": now["torch_allocated_mib"] <= baseline["torch_allocated_mib"] + 1}

    needs_engines = lambda: None if "engine_dir" in state else "no engines (build did not run)"  # noqa: E731
    # cheapest and most telling first; the fp32 export (the largest for sd15) last
    run.step(preset, "build fp16 engines", [no_trt], build)
    run.step(preset, "parse fp16", [no_trt], lambda: parse_export(preset, "fp16"))
    loaded = run.step(preset, "load, scratch, networks vs fp32 torch", [needs_engines()], load_and_compare)
    state["load"] = loaded.results
    run.step(preset, "cuda graphs: replay and forced fallback", [needs_engines()],
             lambda: graph_checks(state["engine_dir"], size))
    run.step(preset, "unet timing B and 2B, graphs on/off", [needs_engines()],
             lambda: unet_timing(state["engine_dir"], size))
    run.step(preset, f"end to end {size}x{size} {args.steps} steps vs eager diffusers SAG", [needs_engines()],
             lambda: end_to_end(preset, state["engine_dir"], size, args))
    run.step(preset, "memory returned after close", [None if loaded.status == "ran" else "load did not run"],
             close_check)
    run.step(preset, "parse fp32", [no_trt], lambda: parse_export(preset, "fp32"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,sd15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--sag-scale", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=540, help="no step starts after this (default: 540)")
    parser.add_argument("--work-dir", default="gpu-check-work", help="exports and engines go here")
    parser.add_argument("--rebuild", action="store_true", help="rebuild engines even if up to date")
    parser.add_argument("--json", default="benchmarks/gpu_check.json")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in SIZES]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(SIZES)}")

    header = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"steps": args.steps, "repeats": args.repeats, "guidance_scale": args.guidance_scale,
                     "sag_scale": args.sag_scale, "seed": args.seed, "batch": 1, "precision": "fp16",
                     "scheduler": "the preset's (DDIM)", "sizes": {p: SIZES[p] for p in presets},
                     "psnr_bound_db": PSNR_BOUND_DB, "budget_s": args.budget_s},
    }
    run = Run(args.budget_s, args.json, header)
    no_cuda = cuda_missing()
    run.step("-", "packages", [], packages_step)
    run.step("-", "pytest -m gpu", [no_cuda], run_gpu_tests)
    for preset in presets:
        check_preset(preset, run, args)
    print(f"\nwrote {args.json}")
    failed = [s for s in run.steps if s.status == "failed" or s.results.get("passed") is False]
    for s in failed:
        print(f"FAILED: [{s.preset}] {s.name}: {s.reason or 'a check did not pass'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
