"""Does keeping the SAG layer in f32 under bf16 change the SAG mask? For benchmarks/RESULTS-openvino.md.

Compiles the export's UNet in bf16 as the backend does, and again with every node of the SAG layer marked to stay
f32 (engine.openvino_runner.keep_float32), then counts, over seeded random UNet inputs at real scale, the mask
positions (score > 1.0) that differ from torch fp32 and the relative error of attn_score and noise_pred. Also lists
the runtime precision OpenVINO chose for the layer's matmuls and softmax.

    python benchmarks/openvino_sag_layer.py --model small --calls 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


from sagrt.engine.openvino_runner import (keep_float32, new_core, onnx_scope, periodic_inputs,  # noqa: E402
                                          phases_from_input)
from sagrt.export.attention import MID_BLOCK_LAYER  # noqa: E402
from sagrt.export.models import build_preset  # noqa: E402
from sagrt.export.onnx_export import export_model  # noqa: E402
from sagrt.metrics import relative_error  # noqa: E402
from sagrt.runtime.torch_runners import TorchRunners  # noqa: E402


def compiled(core, path: Path, mark_layer: bool):
    model = core.read_model(str(path))
    phases_from_input(model)
    names = periodic_inputs(model)
    if mark_layer:
        scope = onnx_scope(MID_BLOCK_LAYER) + "/"
        names |= {op.get_friendly_name() for op in model.get_ops()
                  if op.get_friendly_name().startswith(scope) and op.get_type_name() != "Constant"}
    with tempfile.TemporaryDirectory() as scratch:
        model = keep_float32(core, model, names, Path(scratch))
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})


def layer_precisions(net) -> str:
    scope = onnx_scope(MID_BLOCK_LAYER) + "/"
    rows = []
    for op in net.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if op.get_friendly_name().startswith(scope) and kind in ("MatMul", "FullyConnected", "Softmax"):
            rows.append(f"{op.get_friendly_name()[len(scope):]} {kind} {info['runtimePrecision'].astype(str)}")
    return "; ".join(sorted(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--calls", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    components = build_preset(args.model)
    folder = export_model(components, progress=False)
    core = new_core()
    nets = {"bf16": compiled(core, folder / "unet.onnx", False),
            "bf16, SAG layer marked f32": compiled(core, folder / "unet.onnx", True)}
    reference = TorchRunners(components)
    side, dim = 2 * components.unet.config.sample_size // 2, components.unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    stats = {name: [0, 0, [], []] for name in nets}
    for _ in range(args.calls):
        t = float(torch.randint(1, 1000, (1,), generator=gen))
        sample, context = torch.randn(2, 4, side, side, generator=gen), torch.randn(2, 77, dim, generator=gen)
        with torch.no_grad():
            noise_ref, score_ref = reference.unet(sample, t, context)
        for name, net in nets.items():
            out = net([sample.numpy(), np.array([t], np.float32), context.numpy()])
            noise = torch.from_numpy(out[net.output("noise_pred")])
            score = torch.from_numpy(out[net.output("attn_score")])
            stats[name][0] += int(((score > 1.0) != (score_ref > 1.0)).sum())
            stats[name][1] += score.numel()
            stats[name][2].append(relative_error(score, score_ref))
            stats[name][3].append(relative_error(noise, noise_ref))
    print(f"model {args.model}, {args.calls} UNet calls at batch 2, latent {side}x{side}, random t in 1..999\n")
    print("| compiled | mask positions that differ from torch fp32 | attn_score rel. err (mean) | "
          "noise_pred rel. err (mean) | SAG layer runtime precisions |")
    print("|---|---|---|---|---|")
    for name, (differ, total, score_err, noise_err) in stats.items():
        print(f"| {name} | {differ}/{total} | {np.mean(score_err):.2e} | {np.mean(noise_err):.2e} | "
              f"{layer_precisions(nets[name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
