"""One UNet call (noise_pred + SAG score), eager torch against ONNX Runtime CPU, on the same inputs.

    python benchmarks/unet_cpu.py --model tiny --size 64 --batch 2
    python benchmarks/unet_cpu.py --model small --size 256 --batch 2 [--ort-optimizer]

Warm-up calls are excluded; torch and ORT calls alternate so both see the same machine load; the median of
`--repeats` calls is reported. Prints a Markdown table row and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sagrt.runtime.metrics import relative_error


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transformers_optimized(export_dir: Path, out_dir: Path) -> Path:
    """A copy of the export whose unet.onnx went through onnxruntime.transformers' optimizer (model_type unet)."""
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
    parser.add_argument("--repeats", type=int, default=15)
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
    from sagrt.runtime.runners import TorchRunners

    if args.threads:
        torch.set_num_threads(args.threads)
    components = build_preset(args.model)
    export_dir = export_model(components, work / "onnx", progress=False)
    if args.ort_optimizer:
        export_dir = transformers_optimized(export_dir, work / "onnx-optimized")
    ort_runners = OrtRunners(export_dir, ["cpu"], graph_optimization=args.opt_level, intra_op_threads=args.threads)
    torch_runners = TorchRunners(components)

    gen = torch.Generator().manual_seed(0)
    side = args.size // components.vae_scale_factor
    sample = torch.randn(args.batch, 4, side, side, generator=gen)
    context = torch.randn(args.batch, 77, components.unet.config.cross_attention_dim, generator=gen)
    timestep = torch.tensor([500.0])

    def torch_call():
        with torch.no_grad():
            return torch_runners.unet(sample, timestep, context)

    def ort_call():
        return ort_runners.unet(sample, timestep, context)

    for _ in range(args.warmup):
        torch_call(), ort_call()
    torch_s, ort_s = [], []
    for _ in range(args.repeats):
        torch_s.append(time_call(torch_call))
        ort_s.append(time_call(ort_call))
    noise_t, score_t = torch_call()
    noise_o, score_o = ort_call()
    result = {
        "model": args.model, "image": f"{args.size}x{args.size}", "latent": f"{side}x{side}", "batch": args.batch,
        "torch_ms": statistics.median(torch_s) * 1e3, "ort_ms": statistics.median(ort_s) * 1e3,
        "speedup": statistics.median(torch_s) / statistics.median(ort_s), "repeats": args.repeats,
        "opt_level": args.opt_level, "ort_optimizer": args.ort_optimizer,
        "noise_pred_rel_err": relative_error(noise_o, noise_t), "attn_score_rel_err": relative_error(score_o, score_t),
        "torch": torch.__version__, "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"| {args.model} | {result['image']} | {args.batch} | {result['torch_ms']:.1f} | {result['ort_ms']:.1f} | "
          f"{result['speedup']:.2f}x | {result['noise_pred_rel_err']:.1e} | "
          f"{' '.join(f'{x:.1f}' for x in result['load_avg'])} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
