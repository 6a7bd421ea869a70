"""Where one SAG step's time goes: by operator inside the UNet calls (ONNX Runtime's node profile of sagrt's exported
UNet; torch.profiler on the eager diffusers UNet; one step = a call at batch 2B for CFG and one at B for the degraded
pass), and by Python function over a whole sagrt onnxruntime generation (cProfile self time: the loop around the UNet).

    python benchmarks/profile_step.py --model small --size 256x256 [--calls 3]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

TOP = 8


def step_inputs(height: int, width: int, batch: int, context_dim: int, seed: int = 0):
    """One SAG step's two UNet calls at real scale: (sample, timestep, context) at 2B, then at B."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for b in (2 * batch, batch):
        calls.append((torch.randn(b, 4, height // 8, width // 8, generator=gen), torch.tensor([500.0]),
                      torch.randn(b, 77, context_dim, generator=gen)))
    return calls


def ort_profile(model: str, height: int, width: int, batch: int = 1, calls: int = 3) -> dict:
    """Node time by ONNX op type per SAG step, from a profiled session over sagrt's exported UNet graph."""
    import onnxruntime as ort

    from sagrt.engine.onnxruntime_runner import session_options
    from sagrt.runtime.pipeline import SAGPipeline

    runners = SAGPipeline.from_pretrained(model, backend="onnxruntime", device="cpu", safety_checker=False).runners
    graph = Path(runners.export_dir) / runners.files["unet"]
    runners.close()
    with tempfile.TemporaryDirectory(prefix="sagrt-ort-profile-") as tmp:
        options = session_options(on_gpu=False)  # what OrtRunners runs, with profiling on
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "unet")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        context_dim = session.get_inputs()[2].shape[-1]
        inputs = step_inputs(height, width, batch, context_dim)
        feeds = [dict(sample=s.numpy(), timestep=t.numpy(), encoder_hidden_states=c.numpy()) for s, t, c in inputs]
        for feed in feeds:  # warm-up, left out below
            session.run(None, feed)
        start = time.perf_counter()
        for _ in range(calls):
            for feed in feeds:
                session.run(None, feed)
        wall = (time.perf_counter() - start) / calls
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[len(feeds):]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    by_op = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                any(a <= e["ts"] <= b for a, b in windows):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / calls  # us -> ms per step
    return dict(engine="onnxruntime (CPU EP)", step_ms=wall * 1e3, ops=dict(by_op), calls_per_step=len(feeds))


def torch_profile(model: str, height: int, width: int, batch: int = 1, calls: int = 3) -> dict:
    """Self CPU time by aten op per SAG step, eager diffusers UNet (the baseline's)."""
    from sagrt.export.models import load_model

    unet = load_model(model, safety_checker=False).unet
    inputs = step_inputs(height, width, batch, unet.config.cross_attention_dim)
    with torch.no_grad():
        for s, t, c in inputs:
            unet(s, t, encoder_hidden_states=c)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                for s, t, c in inputs:
                    unet(s, t, encoder_hidden_states=c)
        wall = (time.perf_counter() - start) / calls
    ops = {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return dict(engine="diffusers eager (torch CPU)", step_ms=wall * 1e3, ops=ops, calls_per_step=len(inputs))


def loop_profile(model: str, height: int, width: int, steps: int = 5, backend: str = "onnxruntime",
                 torch_threads: int | None = None) -> dict:
    """Self time by Python function (C calls included) over one warm sagrt generation of `steps` steps;
    `torch_threads` sets torch's intra-op threads for it (the loop's own tensor ops), then restores them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads or threads)
    try:
        return _loop_profile(model, height, width, steps, backend)
    finally:
        torch.set_num_threads(threads)


def _loop_profile(model: str, height: int, width: int, steps: int, backend: str) -> dict:
    from sagrt.bench import PROMPT
    from sagrt.runtime.pipeline import SAGPipeline

    pipe = SAGPipeline.from_pretrained(model, backend=backend, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=7.5,
                  sag_scale=0.75, output_type="latent")
    pipe(generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    wall = (time.perf_counter() - start) / steps
    ops = defaultdict(float)
    for (file, line, name), (_, _, self_time, _, _) in pstats.Stats(profiler).stats.items():
        where = name if file == "~" else f"{name} ({Path(file).name}:{line})"
        ops[where] += self_time * 1e3 / steps
    return dict(engine=f"sagrt {backend} with torch threads {torch.get_num_threads()}, whole generation "
                       f"(cProfile self time)", step_ms=wall * 1e3, ops=dict(ops), calls_per_step=None,
                torch_threads=torch.get_num_threads())


def op_table(profile: dict, top: int = TOP) -> str:
    """Markdown: the `top` ops by time per step, their share of all op time, and the rest summed."""
    total = sum(profile["ops"].values())
    ranked = sorted(profile["ops"].items(), key=lambda item: -item[1])
    what = "UNet calls of one step (2B + B)" if profile["calls_per_step"] else "per step, text encoder and VAE included"
    lines = [f"{profile['engine']}: {what} {profile['step_ms']:.1f} ms wall (profiling on), profiled time "
             f"{total:.1f} ms", "", "| op | ms per step | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / total:.0%} |" for name, ms in ranked[:top]]
    rest = sum(ms for _, ms in ranked[top:])
    if rest:
        lines.append(f"| (other {len(ranked) - top} ops) | {rest:.1f} | {rest / total:.0%} |")
    return "\n".join(lines)


def share(profile: dict, names) -> float:
    """Fraction of the profiled time spent in the ops for which `names(op)` is true."""
    total = sum(profile["ops"].values())
    return sum(ms for op, ms in profile["ops"].items() if names(op)) / total


def top_ops(profile: dict, count: int = 3, names=lambda op: True) -> str:
    total = sum(profile["ops"].values())
    ranked = sorted(((op, ms) for op, ms in profile["ops"].items() if names(op)), key=lambda item: -item[1])
    return ", ".join(f"{op} {ms / total:.0%}" for op, ms in ranked[:count])


def summary(profiles: list[dict]) -> str:
    """What the profiles show, in sentences computed from them."""
    ort, eager, *loops = profiles
    lines = [f"- Inside the UNet calls, ONNX Runtime spends {top_ops(ort)}; eager diffusers spends {top_ops(eager)}."]
    is_run = lambda op: "onnxruntime" in op and ".run>" in op  # noqa: E731  (the session.run built-in)
    for loop in loops:
        rest = (1 - share(loop, is_run)) * loop["step_ms"]
        lines.append(f"- Whole onnxruntime generation with torch on {loop['torch_threads']} thread(s): "
                     f"{loop['step_ms']:.1f} ms per step, {share(loop, is_run):.0%} in ONNX Runtime's run calls; "
                     f"the rest, {rest:.1f} ms per step, is sagrt's loop in torch and Python "
                     f"(largest: {top_ops(loop, names=lambda op: not is_run(op))}).")
    return "\n".join(lines)


def collect(model: str, height: int, width: int, batch: int = 1, calls: int = 3) -> dict:
    """Every profile of one step, JSON-ready: the UNet operators of both engines and the onnxruntime loop (again
    with torch on one thread when it has more, since ONNX Runtime's and torch's thread pools share the cores)."""
    profiles = [ort_profile(model, height, width, batch, calls), torch_profile(model, height, width, batch, calls),
                loop_profile(model, height, width)]
    if torch.get_num_threads() > 1:
        profiles.append(loop_profile(model, height, width, torch_threads=1))
    command = (f"python benchmarks/profile_step.py --model {model} --size {height}x{width} --batch {batch} "
               f"--calls {calls}")
    return dict(command=command, profiles=profiles)


def markdown(collected: dict) -> str:
    """Summary sentences, then one table per profile."""
    return (f"Profiles of one step (`{collected['command']}`): operators inside the UNet calls for each engine, then "
            "Python functions over a whole onnxruntime generation (the loop around the UNet).\n\n"
            + summary(collected["profiles"]) + "\n\n"
            + "\n\n".join(op_table(profile) for profile in collected["profiles"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3, help="profiled steps (default: 3)")
    args = parser.parse_args()
    height, width = (int(side) for side in args.size.split("x"))
    print(markdown(collect(args.model, height, width, args.batch, args.calls)))


if __name__ == "__main__":
    main()
