"""One attention at a given shape on this CPU: OpenVINO (MatMul, Softmax, MatMul as sagrt's export has it, compiled
f32 and bf16) against torch (its fused scaled_dot_product_attention and the explicit form, fp32 and bf16). For
benchmarks/RESULTS-openvino.md: is the `small` UNet's first-level self-attention (8 heads of 8 channels over 1024
tokens) bound by its softmax on every implementation? Run it on a quiet machine.

    python benchmarks/attention_cpu.py --shape 2,8,1024,8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch


def median_ms(call, repeats: int = 20) -> float:
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def openvino_attention(shape, precision: str):
    import openvino as ov
    import openvino.opset13 as ops

    q, k, v = (ops.parameter(list(shape), ov.Type.f32) for _ in range(3))
    scores = ops.multiply(ops.matmul(q, k, False, True), ops.constant(np.float32(shape[-1] ** -0.5)))
    model = ov.Model([ops.matmul(ops.softmax(scores, -1), v, False, False)], [q, k, v])
    config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision], "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(model, "CPU", config).create_infer_request()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2,8,1024,8", help="batch,heads,tokens,channels per head")
    args = parser.parse_args()
    shape = tuple(int(part) for part in args.shape.split(","))
    q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3))
    print(f"attention {shape}, torch threads {torch.get_num_threads()}\n")
    print("| implementation | fp32 ms | bf16 ms |")
    print("|---|---|---|")
    for name, attend in (("torch scaled_dot_product_attention", torch.nn.functional.scaled_dot_product_attention),
                         ("torch explicit (q.kT, softmax, xV)",
                          lambda a, b, c: (a @ b.transpose(-1, -2) * a.shape[-1] ** -0.5).softmax(-1) @ c)):
        times = [median_ms(lambda: attend(*(t.to(dtype) for t in (q, k, v))))
                 for dtype in (torch.float32, torch.bfloat16)]
        print(f"| {name} | {times[0]:.2f} | {times[1]:.2f} |")
    arrays = [t.numpy() for t in (q, k, v)]
    requests = [openvino_attention(shape, precision) for precision in ("fp32", "bf16")]
    times = [median_ms(lambda: request.infer(arrays)) for request in requests]
    print(f"| OpenVINO (MatMul, Softmax, MatMul) | {times[0]:.2f} | {times[1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
