"""What torch's thread count between engine calls costs a whole generation: each CPU engine backend end to end
with the loop's torch ops at the runners' `host_threads` (what sagrt does: 1) and at torch's own count, runs
alternating, medians. For benchmarks/RESULTS-openvino.md; run it on a quiet machine.

    python benchmarks/host_threads.py --model small --size 256 --backends onnxruntime,openvino:bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from sagrt.bench.config import parse_backend_spec
from sagrt.runtime import SAGPipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backends", default="onnxruntime,openvino:bf16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, DDIM, guidance 7.5, SAG 0.75; torch "
          f"threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n")
    print("| backend | loop's torch threads | median end to end s |")
    print("|---|---|---|")
    for spec in args.backends.split(","):
        backend, precision = parse_backend_spec(spec)
        pipe = SAGPipeline.from_pretrained(args.model, backend=backend, scheduler="ddim",
                                           **({"precision": precision} if precision else {}))
        pipe.set_progress_bar_config(disable=True)
        capped = pipe.runners.host_threads

        def run(host_threads) -> float:
            pipe.runners.host_threads = host_threads
            start = time.perf_counter()
            pipe("a photo of an astronaut riding a horse", height=args.size, width=args.size,
                 num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="np")
            return time.perf_counter() - start

        run(capped)  # compile and warm up
        times = {capped: [], None: []}
        for _ in range(args.repeats):
            for host_threads in times:
                times[host_threads].append(run(host_threads))
        for host_threads, runs in times.items():
            threads = host_threads if host_threads is not None else f"{torch.get_num_threads()} (torch's)"
            print(f"| {spec} | {threads} | {statistics.median(runs):.3f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
