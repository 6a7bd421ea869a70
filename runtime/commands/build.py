"""sagrt build --model M [--out DIR]: export if needed, then TensorRT engines for this GPU."""

from __future__ import annotations

from sagrt.engine.profiles import ENGINE_PRECISIONS, OPTIMIZATION_LEVELS, BuildConfig, Range
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.runtime.commands.common import add_model_argument


def add_arguments(parser):
    add_model_argument(parser)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="engine folder (default: sagrt's artifact folder for this model and build)")
    parser.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS,
                        help="engine precision; the SAG attention score stays float32 (default: fp16)")
    parser.add_argument("--batch", default="1:1:4", metavar="MIN:OPT:MAX",
                        help="images per call; the UNet covers B to 2B for SAG's two passes (default: 1:1:4)")
    parser.add_argument("--height", default=None, metavar="MIN:OPT:MAX",
                        help="image heights in pixels, or one height (default: half to twice the model's size)")
    parser.add_argument("--width", default=None, metavar="MIN:OPT:MAX", help="image widths, as --height")
    parser.add_argument("--static", action="store_true",
                        help="one size and batch (their OPT values): faster engines, CUDA graphs at run time")
    parser.add_argument("--optimization-level", type=int, default=3, choices=list(OPTIMIZATION_LEVELS),
                        help="TensorRT builder optimisation level: higher builds longer, may run faster (default: 3)")
    parser.add_argument("--timing-cache", default=None, metavar="FILE",
                        help="timing cache read before and saved after each build (default: DIR/timing.cache)")
    parser.add_argument("--workspace", type=float, default=None, metavar="GIB",
                        help="limit on TensorRT's build workspace in GiB (default: TensorRT's)")
    parser.add_argument("--sag-layer", default=MID_BLOCK_LAYER, help="self-attention layer SAG reads (export option)")
    parser.add_argument("--force", action="store_true", help="rebuild even if matching engines exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_config(args) -> BuildConfig:
    """The CLI options as a checked BuildConfig (bad ranges are SagrtErrors: exit status 2)."""
    return BuildConfig(
        precision=args.precision, batch=Range.parse(args.batch, "--batch"),
        height=Range.parse(args.height, "--height") if args.height else None,
        width=Range.parse(args.width, "--width") if args.width else None,
        static=args.static, optimization_level=args.optimization_level, workspace_gib=args.workspace,
        timing_cache=args.timing_cache,
    )


def run(args) -> int:
    from sagrt.engine.tensorrt_build import build_for_model, require_tensorrt

    config = build_config(args)
    require_tensorrt("sagrt build")  # before any export work
    engine_dir = build_for_model(args.model, config, args.out, sag_layer=args.sag_layer, force=args.force,
                                 progress=not args.no_progress)
    print(f"TensorRT engines in {engine_dir}")
    print(f"generate with: sagrt generate --backend tensorrt --engine-dir {engine_dir} --model {args.model}")
    return 0
