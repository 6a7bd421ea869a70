"""sagrt export: the model's UNet (with the SAG score output), text encoder and VAE decoder to ONNX."""

from __future__ import annotations

import time

from sagrt.export import artifacts, trt_compat
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.export.onnx_export import DEFAULT_OPSET, EXPORT_PRECISIONS, export_folder, export_model
from sagrt.export.models import model_fingerprint
from sagrt.runtime.commands.common import add_model_argument


def add_arguments(parser):
    add_model_argument(parser)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="export folder (default: the sagrt cache, $SAGRT_CACHE or ~/.cache/sagrt)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--precision", default="fp32", choices=EXPORT_PRECISIONS,
                        help="weights and activations; the SAG score stays float32 (default: fp32)")
    parser.add_argument("--sag-layer", default=MID_BLOCK_LAYER, help=f"self-attention layer SAG reads "
                        f"(default: {MID_BLOCK_LAYER})")
    parser.add_argument("--external-data", action="store_true",
                        help="store weights in a .data file beside each graph (automatic over 2 GB; the UNet's "
                             "two graphs always share one)")
    parser.add_argument("--force", action="store_true", help="export again even if a matching export exists")


def run(args) -> int:
    folder = export_folder(model_fingerprint(args.model), args.out, args.precision, args.opset, args.sag_layer)
    reuse = not args.force and artifacts.read_manifest(folder) is not None
    start = time.perf_counter()
    export_model(args.model, folder, opset=args.opset, precision=args.precision, sag_layer=args.sag_layer,
                 force=args.force, external_data=True if args.external_data else None)
    manifest = artifacts.read_manifest(folder)
    sizes = ", ".join(f"{name} {entry['bytes'] / 1e6:.1f} MB" for name, entry in sorted(manifest["files"].items())
                      if ".onnx" in name)
    verb = "reused the matching export in" if reuse else f"exported {args.model} to"
    print(f"{verb} {folder}/ ({sizes}) in {time.perf_counter() - start:.1f} s")
    checked = sorted(f"{name}.onnx" for name in manifest["networks"])
    findings = [f"{name}: {finding}" for name in checked for finding in trt_compat.tensorrt_findings(folder / name)]
    scope = (f"TensorRT {trt_compat.TENSORRT_TARGET} parser check of {', '.join(checked)} "
             f"({manifest['fused_attention_unet']} is ONNX Runtime's)")
    if findings:
        print(f"{scope}: {len(findings)} finding(s); the tensorrt backend will refuse these graphs:\n  "
              + "\n  ".join(findings))
    else:
        print(f"{scope}: every operator and attribute is supported")
    return 0
