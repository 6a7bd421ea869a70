"""Where one OpenVINO UNet call's time goes: OpenVINO's per-node performance counters of the compilation sagrt runs
(static shapes), summed by kind of work over several calls. For benchmarks/RESULTS-openvino.md; run it on a quiet
machine.

    python benchmarks/openvino_profile.py --model small --size 256 --batch 2 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

from sagrt.engine.openvino_runner import OvRunners, openvino_version
from sagrt.export.models import build_preset
from sagrt.export.onnx_export import export_model


def kind_of(node_name: str, node_type: str, exec_type: str) -> str:
    """The row a node's time goes to: attention by layer kind (OpenVINO fuses q.kT, softmax and xV into one
    'Subgraph'), the other fused elementwise subgraphs, and every other node by its type and kernel."""
    if node_type == "Subgraph" and node_name.endswith("/attn1/MatMul_1"):
        return "self-attention (fused q.kT, softmax, xV)"
    if node_type == "Subgraph" and node_name.endswith("/attn2/MatMul_1"):
        return "cross-attention (fused q.kT, softmax, xV)"
    if node_type == "Subgraph":
        return "other fused elementwise subgraphs (GELU, SiLU, norms' scale and shift...)"
    return f"{node_type} ({exec_type})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: one image with CFG)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    components = build_preset(args.model)
    runners = OvRunners(export_model(components, progress=False), args.precision, cache=False)
    runners.config["PERF_COUNT"] = True  # before the first call compiles the UNet
    side = args.size // 8
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, side, side, generator=gen)
    context = torch.randn(args.batch, 77, components.unet.config.cross_attention_dim, generator=gen)
    for _ in range(3):  # compile, then warm up
        runners.unet(sample, torch.tensor(500.0), context)
    _, request = next(iter(runners.loaded["unet"].values()))
    totals, counts, wall = defaultdict(float), defaultdict(int), []
    for _ in range(args.calls):
        start = time.perf_counter()
        runners.unet(sample, torch.tensor(500.0), context)
        wall.append(time.perf_counter() - start)
        for node in request.profiling_info:
            key = kind_of(node.node_name, node.node_type, node.exec_type)
            totals[key] += node.real_time.total_seconds() * 1e3 / args.calls
            counts[key] += 1
    nodes_ms = sum(totals.values())
    print(f"model {args.model}, UNet batch {args.batch}, latent {side}x{side}, OpenVINO {openvino_version()} "
          f"{args.precision}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median call "
          f"{sorted(wall)[len(wall) // 2] * 1e3:.1f} ms, nodes' own time {nodes_ms:.1f} ms\n")
    print("| work | nodes | ms per call | share |")
    print("|---|---|---|---|")
    for key, ms in sorted(totals.items(), key=lambda item: -item[1]):
        if ms >= 0.05:
            print(f"| {key} | {counts[key] // args.calls} | {ms:.2f} | {ms / nodes_ms:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
