"""One UNet call on OpenVINO (fp32, bf16; static shapes as sagrt runs them, and one dynamic compilation) and ONNX
Runtime fp32: median time, GFLOP/s, and the fraction of this machine's OpenVINO matmul peak in the same precision (a
2048^3 MatMul timed the same way). For
benchmarks/RESULTS-openvino.md; run it on a quiet machine (it prints the load average it saw).

    python benchmarks/openvino_unet.py --model small --size 256 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch


from sagrt.engine.openvino_runner import OvRunners, new_core, openvino_version  # noqa: E402
from sagrt.export.models import build_preset  # noqa: E402
from sagrt.export.onnx_export import export_model  # noqa: E402


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_flops(components, batch: int, side: int) -> float:
    """Floating-point operations of one UNet forward (matmuls and convolutions: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.randn(batch, 4, side, side)
    context = torch.randn(batch, 77, components.unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        components.unet(sample, 500, encoder_hidden_states=context)
    return float(counter.get_total_flops())


def matmul_peak(precision: str, repeats: int, n: int = 2048) -> float:
    """FLOP/s of one n x n x n MatMul compiled by OpenVINO at this inference precision."""
    import openvino as ov

    core = new_core()
    a = ov.opset13.parameter([n, n], ov.Type.f32)
    weights = ov.opset13.constant(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    model = ov.Model([ov.opset13.matmul(a, weights, False, False)], [a])
    net = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]})
    request, x = net.create_infer_request(), np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return 2 * n ** 3 / median_seconds(lambda: request.infer([x]), repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: one image with CFG)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    components = build_preset(args.model)
    folder = export_model(components, progress=False)
    side = args.size // 8
    flops = unet_flops(components, args.batch, side)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, side, side, generator=gen)
    context = torch.randn(args.batch, 77, components.unet.config.cross_attention_dim, generator=gen)
    timestep = torch.tensor(500.0)
    print(f"model {args.model}, UNet batch {args.batch}, latent {side}x{side}: {flops / 1e9:.1f} GFLOP per call; "
          f"OpenVINO {openvino_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start\n")
    print("| runner | median ms | GFLOP/s | matmul peak GFLOP/s (same precision) | fraction of peak |")
    print("|---|---|---|---|---|")
    from sagrt.engine.onnxruntime_runner import OrtRunners

    runners = {"onnxruntime fp32": (OrtRunners(folder, ["cpu"]), "fp32"),
               "openvino fp32": (OvRunners(folder, "fp32"), "fp32"),
               "openvino fp32, dynamic shapes": (OvRunners(folder, "fp32", static_shapes=False), "fp32"),
               "openvino bf16": (OvRunners(folder, "bf16"), "bf16"),
               "openvino bf16, dynamic shapes": (OvRunners(folder, "bf16", static_shapes=False), "bf16")}
    peaks = {precision: matmul_peak(precision, args.repeats) for precision in ("fp32", "bf16")}
    for name, (runner, precision) in runners.items():
        seconds = median_seconds(lambda: runner.unet(sample, timestep, context), args.repeats)
        rate = flops / seconds
        print(f"| {name} | {seconds * 1e3:.1f} | {rate / 1e9:.0f} | {peaks[precision] / 1e9:.0f} | "
              f"{rate / peaks[precision]:.2f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
