"""sagrt bench: sagrt backends against eager diffusers (StableDiffusionSAGPipeline), same prompt, seed and settings."""

from __future__ import annotations

import sys
from pathlib import Path

from sagrt.export.artifacts import write_bytes_atomic, write_json_atomic
from sagrt.bench.config import BASELINE_PRECISIONS
from sagrt.bench import PROMPT, BenchConfig, markdown, parse_sizes, run_bench
from sagrt.runtime.commands.common import add_model_argument, writable_dir
from sagrt.runtime.schedulers import canonical_name, scheduler_names


def add_arguments(parser):
    add_model_argument(parser)
    parser.add_argument("--backends", default="onnxruntime", metavar="LIST",
                        help="comma-separated sagrt backends (torch, onnxruntime, tensorrt, openvino, auto), each "
                             "optionally with a precision it runs (openvino:bf16, onnxruntime:fp16), measured "
                             "against the diffusers baseline (default: onnxruntime)")
    parser.add_argument("--baseline-dtype", default="fp32", choices=BASELINE_PRECISIONS,
                        help="precision of the eager diffusers baseline (default: fp32)")
    parser.add_argument("--size", required=True, metavar="HxW[,HxW...]", help="image sizes in pixels, e.g. 64x64")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default: 1)")
    parser.add_argument("--cfg-repeats", type=int, default=None, metavar="N",
                        help="timed sag_scale=0 runs for the SAG overhead (default: as --repeats; 0 skips it)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    parser.add_argument("--sag-scale", type=float, default=0.75, help="self-attention guidance (default: 0.75)")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help=f"one of {', '.join(scheduler_names())}; the diffusers baseline takes only those with "
                             "integer timesteps (ddim, ddpm, pndm, deis, dpm++2m, dpm++2s, unipc) (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="write the tables as Markdown")


def config_from_args(args) -> BenchConfig:
    return BenchConfig(model=args.model, backends=tuple(name.strip() for name in args.backends.split(",") if name),
                       sizes=parse_sizes(args.size), steps=args.steps, batch=args.batch, repeats=args.repeats,
                       warmup=args.warmup, cfg_repeats=args.cfg_repeats, guidance_scale=args.guidance_scale,
                       sag_scale=args.sag_scale,
                       scheduler=args.scheduler, seed=args.seed, prompt=args.prompt, device=args.device,
                       baseline_precision=args.baseline_dtype)


def run(args) -> int:
    config = config_from_args(args)
    for path in (args.json, args.markdown):
        if path:
            writable_dir(Path(path).parent)  # fail before minutes of measuring, not after
    if args.scheduler is not None:
        canonical_name(args.scheduler)  # an unknown name fails here, not in the first worker
    report = run_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = markdown(report)
    print(text)
    if args.json:
        write_json_atomic(args.json, report)
    if args.markdown:
        write_bytes_atomic(args.markdown, text.encode())
    return 0
