"""One command for a machine with an NVIDIA GPU: TensorRT engines for the tiny and sd15 presets,
parity of the tensorrt backend against the torch backend on CUDA, and the timings of both.

    python benchmarks/gpu_check.py [--presets tiny,sd15] [--steps 20] [--repeats 3] [--json FILE]

sd15 is the full SD 1.5 architecture with seeded random weights (nothing is downloaded). Each step
runs when its requirements are met and is otherwise recorded as skipped with the reason; the rest
still runs. Every figure in the table and the JSON was measured by this run, none is estimated.
Parity bound (docs/design.md): fp16 engines vs torch fp16, image PSNR >= 30 dB, same seed and steps.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sagrt import __version__
from sagrt.engine.profiles import BuildConfig, Range
from sagrt.engine.tensorrt_build import cuda_missing, tensorrt_missing
from sagrt.export.artifacts import write_json_atomic
from sagrt.runtime.metrics import psnr_db as psnr
from sagrt.runtime.metrics import relative_error

PSNR_BOUND_DB = 30.0
SIZES = {"tiny": 64, "small": 256, "sd15": 512}  # each preset's own image size


@dataclass
class Step:
    preset: str
    name: str
    status: str = "skipped"  # ran | skipped | failed
    reason: str | None = None
    seconds: float | None = None
    results: dict = field(default_factory=dict)


def run_step(steps: list[Step], preset: str, name: str, missing: list[str | None], work) -> Step:
    """Runs `work()` unless a requirement is missing (a reason string in `missing`); records either way."""
    step = Step(preset, name)
    steps.append(step)
    reasons = [reason for reason in missing if reason]
    if reasons:
        step.reason = "; ".join(reasons)
        print(f"[{preset}] {name}: skipped ({step.reason})", flush=True)
        return step
    print(f"[{preset}] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        step.results = work() or {}
        step.status = "ran"
    except Exception as err:  # a failed step is reported and the others still run
        step.status, step.reason = "failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        traceback.print_exc()
    step.seconds = time.perf_counter() - start
    print(f"[{preset}] {name}: {step.status} in {step.seconds:.1f} s" + (f" ({step.reason})" if step.reason else ""),
          flush=True)
    return step


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


def timed_generation(pipe, args, size: int) -> tuple[dict, np.ndarray]:
    """One warm-up (CUDA graph capture, lazy init), then the median of `repeats` synchronised runs."""
    kwargs = dict(prompt=args.prompt, height=size, width=size, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, sag_scale=args.sag_scale, output_type="np")
    pipe.set_progress_bar_config(disable=True)
    pipe(generator=torch.Generator().manual_seed(args.seed), **kwargs)
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        image = pipe(generator=torch.Generator().manual_seed(args.seed), **kwargs).images
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    t = pipe.timings
    free, total = torch.cuda.mem_get_info()
    return {"seconds_median": statistics.median(times), "seconds": times,
            "step_ms_median": statistics.median(t.steps) * 1e3, "text_ms": t.text * 1e3, "decode_ms": t.decode * 1e3,
            "gpu_memory_used_mib": (total - free) / 2**20}, image


def free_cuda_memory() -> None:
    """Returns to the GPU what the caller's dropped pipeline held (call after `del pipe`), so the next
    backend's memory reading does not include it."""
    gc.collect()
    torch.cuda.empty_cache()


def check_preset(preset: str, args, steps: list[Step], out_dir: Path) -> None:
    from sagrt.runtime import SAGPipeline

    size = SIZES[preset]
    no_cuda = cuda_missing()
    no_export = None if importlib.util.find_spec("sagrt.export.onnx_export") else \
        "the ONNX export stage (sagrt.export.onnx_export) is not in this sagrt"
    config = BuildConfig(precision="fp16", batch=Range(1, 1, 1), height=Range(size, size, size),
                         width=Range(size, size, size), static=True)
    outputs: dict = {}

    def build():
        from sagrt.engine.tensorrt_build import build_for_model

        start = time.perf_counter()
        outputs["engine_dir"] = build_for_model(preset, config, out_dir / f"{preset}-engines", force=args.rebuild)
        return {"engine_dir": str(outputs["engine_dir"]), "build_config": config.to_dict(),
                "seconds_export_and_build": time.perf_counter() - start}

    def run_torch():
        pipe = SAGPipeline.from_pretrained(preset, backend="torch", device="cuda", torch_dtype=torch.float16,
                                           safety_checker=False)
        results, outputs["torch_image"] = timed_generation(pipe, args, size)
        pipe.runners.close()
        del pipe
        free_cuda_memory()
        return results

    def run_tensorrt():
        pipe = SAGPipeline.from_pretrained(preset, backend="tensorrt", device="cuda", safety_checker=False,
                                           engine_dir=outputs["engine_dir"])
        results, outputs["tensorrt_image"] = timed_generation(pipe, args, size)
        results["cuda_graphs"] = all(b.graph is not None for e in pipe.runners.engines.values()
                                     for b in e.bindings.values())
        pipe.runners.close()
        del pipe
        free_cuda_memory()
        return results

    def parity():
        image, reference = outputs["tensorrt_image"], outputs["torch_image"]
        value = psnr(image, reference)
        return {"psnr_db": value, "bound_db": PSNR_BOUND_DB, "passed": value >= PSNR_BOUND_DB,
                "relative_error": relative_error(image, reference)}

    built = run_step(steps, preset, "export + build fp16 engines", [*tensorrt_missing(), no_export], build)
    ran_torch = run_step(steps, preset, "torch fp16 on CUDA", [no_cuda], run_torch)
    ran_trt = run_step(steps, preset, "tensorrt fp16", [None if built.status == "ran" else
                                                        f"no engines (build {built.status})"], run_tensorrt)
    run_step(steps, preset, "parity tensorrt vs torch", [
        None if ran_torch.status == "ran" else f"no torch image ({ran_torch.status})",
        None if ran_trt.status == "ran" else f"no tensorrt image ({ran_trt.status})"], parity)


def table(steps: list[Step]) -> str:
    rows = ["| preset | step | status | s/image (median) | step ms | text ms | decode ms | PSNR dB | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        r = s.results
        cell = lambda key, fmt="{:.1f}": fmt.format(r[key]) if key in r else ""  # noqa: E731
        note = s.reason or ("passed" if r.get("passed") else "below bound" if "passed" in r else "")
        rows.append(f"| {s.preset} | {s.name} | {s.status} | {cell('seconds_median', '{:.3f}')} | "
                    f"{cell('step_ms_median')} | {cell('text_ms')} | {cell('decode_ms')} | {cell('psnr_db')} | {note} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--sag-scale", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="gpu-check-work", help="engines are built here")
    parser.add_argument("--rebuild", action="store_true", help="rebuild engines even if up to date")
    parser.add_argument("--json", default="benchmarks/gpu_check.json")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in SIZES]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(SIZES)}")

    steps: list[Step] = []
    for preset in presets:
        check_preset(preset, args, steps, Path(args.work_dir))
    print()
    print(table(steps))
    report = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"steps": args.steps, "repeats": args.repeats, "guidance_scale": args.guidance_scale,
                     "sag_scale": args.sag_scale, "seed": args.seed, "batch": 1, "precision": "fp16",
                     "scheduler": "the preset's (DDIM)", "sizes": {p: SIZES[p] for p in presets},
                     "psnr_bound_db": PSNR_BOUND_DB},
        "steps": [asdict(s) for s in steps],
    }
    write_json_atomic(args.json, report, default=str)
    print(f"\nwrote {args.json}")
    failed = [s for s in steps if s.status == "failed" or s.results.get("passed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
