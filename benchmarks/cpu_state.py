"""Why one ONNX Runtime UNet call on this 2-core VM is sometimes 30% slower: a trace of the machine's state.

    python benchmarks/cpu_state.py --model small --size 256 --seconds 120

Over `--seconds`, repeats: one batch-2 call of sagrt's fused UNet graph on a 2-thread session (what sagrt runs),
the same call on a 1-thread session pinned to core 0 and then to core 1 (each core alone), and the batch split
in two batch-1 calls run at once on the 1-thread session, one per core (both cores busy, no data shared between
them). Prints one line per round and, at the end, the medians of the rounds where the 2-thread call was slow
(over 1.15x its fastest decile) and of the others.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()

    import onnxruntime as ort

    from sagrt.engine.onnxruntime_runner import session_options
    from sagrt.export import artifacts
    from sagrt.export.models import build_preset
    from sagrt.export.onnx_export import export_model

    components = build_preset(args.model)
    folder = export_model(components, progress=False)
    graph = str(Path(folder) / artifacts.read_manifest(folder)["fused_attention_unet"])
    sessions = {threads: ort.InferenceSession(graph, session_options(on_gpu=False, intra_op_threads=threads),
                                              providers=["CPUExecutionProvider"]) for threads in (1, 2)}
    gen = torch.Generator().manual_seed(0)
    side = args.size // components.vae_scale_factor
    feed = {"sample": torch.randn(2, 4, side, side, generator=gen).numpy(), "timestep": torch.tensor([500.0]).numpy(),
            "encoder_hidden_states": torch.randn(2, 77, components.unet.config.cross_attention_dim,
                                                 generator=gen).numpy()}
    halves = [{k: v if k == "timestep" else v[i:i + 1] for k, v in feed.items()} for i in range(2)]
    pool = ThreadPoolExecutor(2)
    cores = sorted(os.sched_getaffinity(0))

    def on_core(core):
        os.sched_setaffinity(0, {core})
        try:
            return timed(lambda: sessions[1].run(None, feed))
        finally:
            os.sched_setaffinity(0, set(cores))

    measures = {
        "2 threads": lambda: timed(lambda: sessions[2].run(None, feed)),
        "core 0 alone": lambda: on_core(cores[0]),
        "core 1 alone": lambda: on_core(cores[1]),
        "split, 1 per core": lambda: timed(lambda: list(pool.map(lambda f: sessions[1].run(None, f), halves))),
    }
    for measure in measures.values():  # warm-up
        measure()
    rounds = []
    start = time.time()
    while time.time() - start < args.seconds:
        rounds.append({name: measure() for name, measure in measures.items()})
        print(f"{time.time() - start:6.1f} s  " + "  ".join(f"{k} {v:6.1f} ms" for k, v in rounds[-1].items()),
              flush=True)
    fast = sorted(r["2 threads"] for r in rounds)[len(rounds) // 10]
    groups = {"slow": [r for r in rounds if r["2 threads"] > 1.15 * fast],
              "normal": [r for r in rounds if r["2 threads"] <= 1.15 * fast]}
    print(f"\n{args.model} {args.size}x{args.size} batch 2, {len(rounds)} rounds, medians in ms "
          f"(second thread's gain: best single core / 2 threads)")
    print("| rounds | count | " + " | ".join(measures) + " | second thread's gain |")
    print("|---|---|" + "---|" * (len(measures) + 1))
    for label, group in groups.items():
        if group:
            medians = {name: statistics.median(r[name] for r in group) for name in measures}
            gain = min(medians["core 0 alone"], medians["core 1 alone"]) / medians["2 threads"]
            print(f"| {label} | {len(group)} | " + " | ".join(f"{v:.1f}" for v in medians.values())
                  + f" | {gain:.2f}x |")


if __name__ == "__main__":
    main()
