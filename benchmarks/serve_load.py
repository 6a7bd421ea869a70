"""Load test of `sagrt serve` on loopback: latency percentiles and images/s by concurrency, the server's
overhead over a bare pipeline call, batching (--max-batch 4 vs 1) and a burst far past --max-queue.

    python benchmarks/serve_load.py                      # tiny 64x64 and small 256x256, 20 steps (long)
    python benchmarks/serve_load.py --models tiny --concurrency 1,2 --requests 8 --quick   # smoke test

Each measurement starts its own `sagrt serve` subprocess on 127.0.0.1 and drives it with an asyncio client
(closed loop: `concurrency` clients each send their next request when the last one is answered), bounded by
--requests per level and --level-seconds. The server overhead takes requests at concurrency 1 and bare pipeline
calls in this process (same model, size, steps and per-image arguments) in turn, so both see the same machine
state. Writes JSON and a Markdown page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"tiny": 64, "small": 256, "sd15": 512}
TARGETS = {"overhead_ms_tiny": 5.0, "p99_over_p50_at_1": 1.3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `sagrt serve` subprocess, ready when constructed; `stop()` sends SIGTERM and returns its exit code."""

    def __init__(self, model: str, backend: str, max_batch: int, max_queue: int, max_size: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sagrt.runtime.cli", "serve", "--model", model, "--backend", backend,
             "--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
             "--max-size", f"{max_size}x{max_size}", "--log-level", "warning", "--timeout", "600"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sagrt serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sagrt serve not ready after 600 s")
            time.sleep(0.2)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def body(model: str, steps: int, seed: int) -> dict:
    size = SIZES.get(model, 64)
    return {"prompt": "a photo of an astronaut riding a horse", "width": size, "height": size,
            "num_inference_steps": steps, "seed": seed}


async def closed_loop(url: str, concurrency: int, requests: int, seconds: float, model: str, steps: int) -> dict:
    """`concurrency` clients, each sending its next request when its last one is answered."""
    results: list[tuple[int, float]] = []
    sent = 0
    stop_at = time.monotonic() + seconds

    async def client_loop(client):
        nonlocal sent
        while sent < requests and time.monotonic() < stop_at:
            sent += 1
            start = time.perf_counter()
            response = await client.post(url + "/v1/generate", json=body(model, steps, sent))
            results.append((response.status_code, time.perf_counter() - start))

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return summarize(results, wall) | {"concurrency": concurrency}


def summarize(results, wall: float) -> dict:
    ok = sorted(latency for status, latency in results if status == 200)
    codes: dict[str, int] = {}
    for status, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1

    def pct(q):
        return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))] * 1e3 if ok else None

    return {"requests": len(results), "statuses": codes, "wall_s": round(wall, 3),
            "images_per_s": round(len(ok) / wall, 3) if wall else None,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


async def burst(url: str, count: int, model: str, steps: int) -> dict:
    """`count` requests sent at once: every one must be answered, with 200 or 429 only."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count + 4)) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post(url + "/v1/generate", json=body(model, steps, i))
                                           for i in range(count)), return_exceptions=True)
        wall = time.perf_counter() - start
    codes: dict[str, int] = {}
    for response in responses:
        key = str(response.status_code) if isinstance(response, httpx.Response) else type(response).__name__
        codes[key] = codes.get(key, 0) + 1
    retry_after = sorted({r.headers.get("retry-after") for r in responses
                          if isinstance(r, httpx.Response) and r.status_code == 429})
    return {"sent": count, "statuses": codes, "answered": sum(isinstance(r, httpx.Response) for r in responses),
            "wall_s": round(wall, 3), "retry_after": retry_after}


def bare_pipeline(model: str, backend: str, steps: int):
    """A function timing one bare pipeline call (ms) with the server's arguments (one image, per-image lists)."""
    import torch

    from sagrt.runtime import SAGPipeline

    pipe = SAGPipeline.from_pretrained(model, backend=backend, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = SIZES.get(model, 64)

    def call(seed: int) -> float:
        start = time.perf_counter()
        pipe([body(model, steps, 0)["prompt"]], height=size, width=size, num_inference_steps=steps,
             guidance_scale=[7.5], sag_scale=[0.75], negative_prompt=[""],
             generator=[torch.Generator().manual_seed(seed)], output_type="np")
        return (time.perf_counter() - start) * 1e3

    call(0)  # warm-up, as the server's
    return call


def interleaved_overhead(url: str, bare, model: str, steps: int, repeats: int) -> dict:
    """One request, then one bare call in this process, in turn (the server is idle during the bare call), so
    both see the same machine state. Also the server's own view: latency minus its X-Sagrt-Run-Ms."""
    http, bare_ms, inside = [], [], []
    with httpx.Client(timeout=600) as client:
        client.post(url + "/v1/generate", json=body(model, steps, 0))  # connection and first-call warm-up
        for seed in range(repeats):
            start = time.perf_counter()
            response = client.post(url + "/v1/generate", json=body(model, steps, seed))
            latency = (time.perf_counter() - start) * 1e3
            http.append(latency)
            inside.append(latency - float(response.headers["x-sagrt-run-ms"]))
            bare_ms.append(bare(seed))
    return {"http_p50_ms": statistics.median(http), "bare_p50_ms": statistics.median(bare_ms),
            "overhead_ms": statistics.median(http) - statistics.median(bare_ms),
            "outside_call_p50_ms": statistics.median(inside), "pairs": repeats}


def run_model(args, model: str) -> dict:
    size = SIZES.get(model, 64)
    out: dict = {"model": model, "size": f"{size}x{size}", "steps": args.steps}
    bare = bare_pipeline(model, args.backend, args.steps)
    server = Server(model, args.backend, max_batch=4, max_queue=256, max_size=size)
    try:
        out["levels"] = [asyncio.run(closed_loop(server.url, c, args.requests, args.level_seconds, model, args.steps))
                         for c in args.concurrency]
        out["overhead"] = interleaved_overhead(server.url, bare, model, args.steps, args.bare_repeats)
    finally:
        out["exit_code_batch4"] = server.stop()
    top = max(args.concurrency)
    server = Server(model, args.backend, max_batch=1, max_queue=256, max_size=size)
    try:
        out["batch1_at_top"] = asyncio.run(closed_loop(server.url, top, args.requests, args.level_seconds, model,
                                                       args.steps))
    finally:
        out["exit_code_batch1"] = server.stop()
    if not args.no_burst:
        server = Server(model, args.backend, max_batch=4, max_queue=args.burst_queue, max_size=size)
        try:
            out["burst"] = asyncio.run(burst(server.url, args.burst_factor * args.burst_queue, model, args.steps))
            out["burst"]["max_queue"] = args.burst_queue
        finally:
            out["exit_code_burst"] = server.stop()
    out["bare_pipeline_ms"] = out["overhead"]["bare_p50_ms"]
    out["server_overhead_ms"] = out["overhead"]["overhead_ms"]
    first = next(level for level in out["levels"] if level["concurrency"] == min(args.concurrency))
    out["p99_over_p50_at_1"] = first["p99_ms"] / first["p50_ms"] if first["p50_ms"] else None
    at_top = next(level for level in out["levels"] if level["concurrency"] == top)
    out["batch4_over_batch1_images_per_s"] = (at_top["images_per_s"] / out["batch1_at_top"]["images_per_s"]
                                              if out["batch1_at_top"]["images_per_s"] else None)
    return out


def environment() -> dict:
    import diffusers
    import fastapi
    import torch
    import uvicorn

    from sagrt import __version__

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "sagrt": __version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def verdicts(models: list[dict]) -> list[str]:
    lines = []
    for m in models:
        levels = m["levels"] + [m["batch1_at_top"]]
        five_xx = sum(n for level in levels for code, n in level["statuses"].items() if code.startswith("5"))
        lines.append(f"{m['model']}: 5xx under load: {five_xx} (target 0)")
        if m.get("burst"):
            b = m["burst"]
            other = {code: n for code, n in b["statuses"].items() if code not in ("200", "429")}
            lines.append(f"{m['model']}: burst of {b['sent']} past --max-queue {b['max_queue']}: answered "
                         f"{b['answered']}/{b['sent']}, statuses {b['statuses']}"
                         + (f" (NOT only 200/429: {other})" if other else " (only 200 and 429)"))
        ratio = m["p99_over_p50_at_1"]
        lines.append(f"{m['model']}: p99/p50 at concurrency 1: {ratio:.3f} (target < {TARGETS['p99_over_p50_at_1']})"
                     if ratio else f"{m['model']}: p99/p50 at concurrency 1: n/a")
        if m["model"] == "tiny" and m["server_overhead_ms"] is not None:
            lines.append(f"tiny: server overhead {m['server_overhead_ms']:.2f} ms "
                         f"(target < {TARGETS['overhead_ms_tiny']} ms)")
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# sagrt serve under load", "", f"Command: `{report['command']}`", "",
             f"Date {env['date']}; machine {env['machine']} ({env['cpu']}, {env['cores']} cores, "
             f"OMP_NUM_THREADS={env['omp_num_threads']}); sagrt {env['sagrt']}, torch {env['torch']}, diffusers "
             f"{env['diffusers']}, fastapi {env['fastapi']}, uvicorn {env['uvicorn']}, Python {env['python']}.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for m in report["models"]:
        lines += [f"## {m['model']} {m['size']}, {m['steps']} steps", "",
                  "| concurrency | requests | images/s | p50 ms | p95 ms | p99 ms | statuses |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for level in m["levels"]:
            lines.append(f"| {level['concurrency']} | {level['requests']} | {level['images_per_s']} | "
                         f"{fmt(level['p50_ms'])} | {fmt(level['p95_ms'])} | {fmt(level['p99_ms'])} | "
                         f"{level['statuses']} |")
        b1 = m["batch1_at_top"]
        o = m["overhead"]
        lines += ["", f"- server overhead at concurrency 1: p50 {o['http_p50_ms']:.2f} ms over HTTP minus p50 "
                      f"{o['bare_p50_ms']:.2f} ms of the bare pipeline call, taken in turn ({o['pairs']} pairs): "
                      f"{o['overhead_ms']:.2f} ms; the server's own view (latency minus its pipeline call): "
                      f"{o['outside_call_p50_ms']:.2f} ms",
                  f"- --max-batch 1 at concurrency {b1['concurrency']}: {b1['images_per_s']} images/s "
                  f"(p50 {fmt(b1['p50_ms'])} ms); --max-batch 4 over 1: "
                  f"{fmt(m['batch4_over_batch1_images_per_s'], 2)}x"]
        if m.get("burst"):
            lines.append(f"- burst: {m['burst']['sent']} requests at once, --max-queue {m['burst']['max_queue']}: "
                         f"{m['burst']['statuses']}, answered {m['burst']['answered']}, Retry-After "
                         f"{m['burst']['retry_after']}")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {line}" for line in report["verdicts"]] + [""]
    return "\n".join(lines)


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default: 64)")
    parser.add_argument("--level-seconds", type=float, default=120, help="time cap per level (default: 120)")
    parser.add_argument("--bare-repeats", type=int, default=20)
    parser.add_argument("--burst-queue", type=int, default=8, help="--max-queue of the burst server (default: 8)")
    parser.add_argument("--burst-factor", type=int, default=8, help="burst = factor x max-queue (default: 8)")
    parser.add_argument("--no-burst", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: results go to a temporary name")
    parser.add_argument("--note", default=None, help="a line for the results page (e.g. the machine's load)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve-load.json"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    models = [run_model(args, model) for model in args.models.split(",")]
    report = {"command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
              "environment": environment(), "models": models, "targets": TARGETS, "note": args.note}
    report["verdicts"] = verdicts(models)
    out = Path(args.out)
    if args.quick:
        out = out.with_name(out.stem + "-quick" + out.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    page = out.parent.parent / ("SERVE-LOAD" + ("-quick" if args.quick else "") + ".md")
    page.write_text(markdown(report))
    print("\n".join(report["verdicts"]))
    print(f"wrote {out} and {page}")


if __name__ == "__main__":
    main()
