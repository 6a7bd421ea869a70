"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sagrt.errors import SagrtError
from sagrt.export.artifacts import atomic_path
from sagrt.networks import MID_BLOCK_LAYER, PRECISIONS
from sagrt.runtime.backends import BACKEND_NAMES, BackendError
from sagrt.runtime.pipeline import SAGConfig, SAGPipeline
from sagrt.runtime.schedulers import make_scheduler, scheduler_names


# the trained preset: the default of the commands that make pictures (generate, compare, serve); the others
# (export, build, parity, bench) default to tiny, the smallest model
PICTURE_MODEL = "shapes"


def add_model_argument(parser, default: str = "tiny") -> None:
    """--model, the same for every command."""
    parser.add_argument("--model", default=default,
                        help=f"preset (shapes, tiny, small, sd15) or a local diffusers folder (default: {default})")


def add_model_arguments(parser, backend_choice=True, default_model: str = "tiny"):
    """--model, --backend and the backends' options (each backend refuses the options it does not take)."""
    add_model_argument(parser, default_model)
    if backend_choice:
        parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                            metavar="{" + ",".join(BACKEND_NAMES) + "}",
                            help="engine backend; auto: tensorrt where usable, else onnxruntime (default: auto)")
    parser.add_argument("--precision", "--dtype", dest="precision", default=None, choices=list(PRECISIONS),
                        help="compute precision of the networks: torch any, onnxruntime fp32|fp16 (the export's), "
                             "tensorrt fp16|fp32 (the engines'); the SAG score stays float32 (default: the backend's)")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu or cuda[:N] (default: cuda if present; onnxruntime and tensorrt too)")
    parser.add_argument("--provider", default=None, metavar="NAMES",
                        help="onnxruntime execution providers, comma-separated: tensorrt, cuda, cpu "
                             "(default: the first installed of those)")
    parser.add_argument("--export-dir", default=None, metavar="DIR",
                        help="onnxruntime, openvino: ONNX export folder to use (made there if empty; default: the cache)")
    parser.add_argument("--engine-dir", default=None, metavar="DIR",
                        help="tensorrt: engines from `sagrt build --out DIR` (default: build on first use)")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                        help="tensorrt: run engines without CUDA graphs (default: one graph per call shape)")
    parser.add_argument("--dynamic-shapes", dest="static_shapes", action="store_false", default=None,
                        help="openvino: one compilation serves every input shape (less memory; a UNet call takes "
                             "15-25%% longer; default: one compilation per input shapes, on first use)")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="do not run the model folder's safety checker")
    parser.add_argument("--sag-layer", default=MID_BLOCK_LAYER, metavar="PATH",
                        help=f"self-attention layer SAG reads; engine backends export it (default: {MID_BLOCK_LAYER}; "
                             "e.g. up_blocks.1.attentions.0.transformer_blocks.0.attn1)")


# CLI flag -> backend option (runtime/backends.py options dataclasses)
OPTION_FLAGS = {"device": "--device", "precision": "--precision", "providers": "--provider",
                "export_dir": "--export-dir", "engine_dir": "--engine-dir", "cuda_graph": "--no-cuda-graph",
                "static_shapes": "--dynamic-shapes"}


def backend_options(args) -> dict:
    """The backend options given on the command line (not their defaults)."""
    values = {"device": args.device, "precision": args.precision, "providers": args.provider,
              "export_dir": args.export_dir, "engine_dir": args.engine_dir, "cuda_graph": args.cuda_graph,
              "static_shapes": args.static_shapes}
    return {key: value for key, value in values.items() if value is not None}


def add_sampling_arguments(parser):
    """Arguments of one generation: the shared ones plus one scheduler and one SAG scale."""
    add_denoise_arguments(parser)
    parser.add_argument("--sag-scale", type=float, default=0.75, help="self-attention guidance (default: 0.75)")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help=f"one of {', '.join(scheduler_names())} (default: the model's)")
    add_sag_arguments(parser)


def add_denoise_arguments(parser):
    """Arguments shared by every command that denoises, whatever scheduler and SAG scale it runs."""
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--karras-sigmas", action="store_true", help="Karras sigma spacing, where the scheduler has it")
    parser.add_argument("--seed", type=int, default=0)


def add_sag_arguments(parser):
    """SAG's own controls; defaults are diffusers' values."""
    parser.add_argument("--sag-threshold", type=float, default=1.0,
                        help="mask positions whose attention score exceeds this (default: 1.0)")
    parser.add_argument("--sag-blur-sigma", type=float, default=1.0, help="Gaussian blur sigma (default: 1.0)")
    parser.add_argument("--sag-blur-kernel", type=int, default=9, help="odd blur kernel size (default: 9)")
    parser.add_argument("--sag-window", default="0:1", metavar="START:END",
                        help="fractions of the schedule where SAG runs; outside it no degraded UNet pass "
                             "(default: 0:1, every step)")


def sag_config(args) -> SAGConfig:
    try:
        start, end = (float(part) for part in args.sag_window.split(":"))
    except ValueError:
        raise SagrtError(f"--sag-window {args.sag_window!r} must be START:END, e.g. 0:0.5") from None
    return SAGConfig(threshold=args.sag_threshold, blur_sigma=args.sag_blur_sigma, blur_kernel=args.sag_blur_kernel,
                     window=(start, end))


def open_pipeline(args, backend: str | None = None, options: dict | None = None):
    """The pipeline of --model/--backend/--sag-layer and the backend's options, with the model's own scheduler."""
    options = backend_options(args) if options is None else options
    try:
        return SAGPipeline.from_pretrained(args.model, backend=backend or args.backend,
                                           safety_checker=not args.no_safety_checker, sag_layer=args.sag_layer,
                                           **options)
    except BackendError as err:  # name the flag, not the API's keyword
        message = str(err)
        for key, flag in OPTION_FLAGS.items():
            message = message.replace(f"option {key}", f"option {flag}")
        raise BackendError(message) from None


def load_pipeline(args, backend: str | None = None, options: dict | None = None):
    """open_pipeline with the scheduler of --scheduler/--karras-sigmas."""
    pipe = open_pipeline(args, backend, options)
    if args.scheduler is not None or args.karras_sigmas:
        name = args.scheduler or type(pipe.scheduler).__name__
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config, karras_sigmas=args.karras_sigmas or None)
    return pipe


def writable_dir(path: str | Path) -> Path:
    """Creates `path` if needed and proves it writable before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sagrt-probe-"):
            pass
    except OSError as err:
        raise SagrtError(f"cannot write to {path}: {err.strerror or err}") from None
    return path


def save_image_atomic(image, path: Path) -> None:
    """Writes a PIL image as PNG to a temporary name beside `path`, then renames it into place."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
