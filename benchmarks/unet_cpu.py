"""One UNet call (noise_pred + SAG score), eager torch against ONNX Runtime CPU, on the same inputs.

    python benchmarks/unet_cpu.py --model tiny --size 64 --batch 2
    python benchmarks/unet_cpu.py --model small --size 256 --batch 2 [--ort-optimizer]

Times eager torch, ONNX Runtime on the portable unet.onnx and on unet_fused.onnx (fused attention: what sagrt runs).

Warm-up calls are excluded. Torch and ORT alternate in rounds of `--block` consecutive calls each, so both see
the same machine state (this VM's speed drifts by up to 30% over minutes); within a round the first call of each
engine runs right after the other engine's and is reported on its own ("first call", the other library's
threads still winding down); the headline is the median over the other calls of every round, as a generation
runs its UNet calls back to back. Prints a Markdown table row and a JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sagrt.metrics import relative_error


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transformers_optimized(export_dir: Path, out_dir: Path) -> Path:
    """A copy of the export whose unet.onnx (the portable graph) went through onnxruntime.transformers' optimizer
    (model_type unet)."""
    import shutil

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from sagrt.export import artifacts

    shutil.copytree(export_dir, out_dir)
    options = FusionOptions("unet")
    # GroupNorm, NhwcConv, BiasSplitGelu and BiasAdd fuse into CUDA-only contrib ops; attention fusion cannot
    # read the head count of this graph (it fails), so only the CPU-capable fusions stay on
    for name in ("enable_attention", "enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv",
                 "enable_bias_splitgelu", "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
        setattr(options, name, False)
    optimized = optimize_model(str(export_dir / "unet.onnx"), model_type="unet", opt_level=0, use_gpu=False,
                               optimization_options=options)
    optimized.save_model_to_file(str(out_dir / "unet.onnx"))
    manifest = artifacts.read_manifest(out_dir)
    entry = manifest["files"]["unet.onnx"]
    entry.update(sha256=artifacts.sha256_file(out_dir / "unet.onnx"), bytes=(out_dir / "unet.onnx").stat().st_size)
    artifacts.write_manifest(out_dir, manifest)
    return out_dir


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sagrt-bench-") as work:
        benchmark(Path(work))


def benchmark(work: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="rounds")
    parser.add_argument("--block", type=int, default=3, help="consecutive calls of one engine per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--opt-level", default="all", choices=["none", "basic", "extended", "all"],
                        help="ONNX Runtime graph optimisation level")
    parser.add_argument("--ort-optimizer", action="store_true",
                        help="also run onnxruntime.transformers' optimizer (model_type unet) on the UNet graph")
    parser.add_argument("--threads", type=int, default=0, help="threads for both (0: library default)")
    args = parser.parse_args()

    import onnxruntime as ort

    from sagrt.engine.onnxruntime_runner import OrtRunners
    from sagrt.export.models import build_preset
    from sagrt.export.onnx_export import export_model
    from sagrt.runtime.torch_runners import TorchRunners

    if args.threads:
        torch.set_num_threads(args.threads)
    components = build_preset(args.model)
    export_dir = export_model(components, work / "onnx", progress=False)
    if args.ort_optimizer:
        export_dir = transformers_optimized(export_dir, work / "onnx-optimized")
    # the portable graph (what TensorRT builds from) and the one sagrt runs on ONNX Runtime (fused attention)
    ort_engines = {graph: OrtRunners(export_dir, ["cpu"], graph_optimization=args.opt_level,
                                     intra_op_threads=args.threads, fused_attention=fused)
                   for graph, fused in (("unet.onnx", False), ("unet_fused.onnx", True))}
    torch_runners = TorchRunners(components)

    gen = torch.Generator().manual_seed(0)
    side = args.size // components.vae_scale_factor
    sample = torch.randn(args.batch, 4, side, side, generator=gen)
    context = torch.randn(args.batch, 77, components.unet.config.cross_attention_dim, generator=gen)
    timestep = torch.tensor([500.0])

    def torch_call():
        with torch.no_grad():
            return torch_runners.unet(sample, timestep, context)

    calls = {"torch": torch_call, **{graph: functools.partial(runners.unet, sample, timestep, context)
                                     for graph, runners in ort_engines.items()}}
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times = {name: ([], []) for name in calls}  # (first call of a round, the others)
    for _ in range(args.repeats):
        for name, call in calls.items():
            first, rest = times[name]
            first.append(time_call(call))
            rest.extend(time_call(call) for _ in range(args.block - 1))
    median_ms = {name: (statistics.median(first) * 1e3, statistics.median(rest) * 1e3)
                 for name, (first, rest) in times.items()}
    noise_t, score_t = torch_call()
    machine = {"torch": torch.__version__, "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    for graph in ort_engines:
        noise_o, score_o = calls[graph]()
        result = {
            "model": args.model, "image": f"{args.size}x{args.size}", "latent": f"{side}x{side}",
            "batch": args.batch, "ort_graph": graph, "torch_ms": median_ms["torch"][1], "ort_ms": median_ms[graph][1],
            "speedup": median_ms["torch"][1] / median_ms[graph][1],
            "torch_first_ms": median_ms["torch"][0], "ort_first_ms": median_ms[graph][0],
            "first_call_speedup": median_ms["torch"][0] / median_ms[graph][0],
            "repeats": args.repeats, "block": args.block, "opt_level": args.opt_level,
            "ort_optimizer": args.ort_optimizer, "noise_pred_rel_err": relative_error(noise_o, noise_t),
            "attn_score_rel_err": relative_error(score_o, score_t), **machine,
        }
        print(f"| {args.model} | {result['image']} | {args.batch} | {graph} | {result['torch_ms']:.1f} | "
              f"{result['ort_ms']:.1f} | {result['speedup']:.2f}x | {result['first_call_speedup']:.2f}x | "
              f"{result['noise_pred_rel_err']:.1e} | {' '.join(f'{x:.1f}' for x in machine['load_avg'])} |")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
