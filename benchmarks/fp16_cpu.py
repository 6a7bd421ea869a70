"""The fp16 export on ONNX Runtime (CPU) against fp32 torch, network by network (engine/precision.py):
what the fp16 graph TensorRT builds from (unet.onnx, not the fused-attention copy) computes, before any GPU.

    python benchmarks/fp16_cpu.py [--model small] [--size 256] [--json benchmarks/results/fp16-cpu-small.json]

ONNX Runtime's CPU provider has fp16 kernels for few operators; for the others it inserts casts and computes in
fp32 between fp16 tensors. So this measures the graph's fp16 storage and the precision its casts pin (fp32
normalisations, SAG softmax and score), not fp16 arithmetic as a GPU does it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sagrt.engine.onnxruntime_runner import OrtRunners
from sagrt.engine.precision import compare_networks
from sagrt.export.models import load_model
from sagrt.export.onnx_export import export_model
from sagrt.runners import ModelInfo
from sagrt.runtime.torch_runners import TorchRunners


def fp16_report(model: str, size: int, export_dir: Path, seed: int = 0) -> dict:
    components = load_model(model, safety_checker=False)
    start = time.perf_counter()
    folder = export_model(components, export_dir, precision="fp16", progress=False)
    export_s = time.perf_counter() - start
    candidate = OrtRunners(folder, ["cpu"], fused_attention=False)
    report = compare_networks(candidate, TorchRunners(components), ModelInfo.of(components), size, size, seed=seed)
    return {"model": model, "size": size, "seed": seed, "export_seconds": round(export_s, 1),
            "torch_threads": torch.get_num_threads(), **report}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = fp16_report(args.model, args.size, Path(tmp) / "export")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
