"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sagrt.engine.openvino_runner import add_precision_argument
from sagrt.errors import SagrtError
from sagrt.export.artifacts import atomic_path
from sagrt.export.attention import MID_BLOCK_LAYER
from sagrt.runtime.backends import BACKENDS
from sagrt.runtime.pipeline import SAGConfig
from sagrt.runtime.schedulers import scheduler_names

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # bf16: torch on CPU


def add_model_arguments(parser, backends=BACKENDS, backend_choice=True):
    parser.add_argument("--model", default="tiny",
                        help="preset (tiny, small, sd15) or a local diffusers folder (default: tiny)")
    if backend_choice:
        parser.add_argument("--backend", default="torch", choices=backends, metavar="{" + ",".join(backends) + "}",
                            help="engine backend (default: torch)")
    parser.add_argument("--provider", default=None, metavar="NAMES",
                        help="onnxruntime execution providers, comma-separated: tensorrt, cuda, cpu "
                             "(default: the first installed of those)")
    parser.add_argument("--export-dir", default=None, metavar="DIR",
                        help="onnxruntime, openvino: ONNX export folder to use (made there if empty; default: the cache)")
    add_precision_argument(parser)  # openvino: fp32|bf16
    parser.add_argument("--device", default=None, help="torch device for the torch backend (default: cuda if present)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="precision of the torch backend")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="do not run the model folder's safety checker")
    parser.add_argument("--engine-dir", default=None, metavar="DIR",
                        help="tensorrt backend: engines from `sagrt build --out DIR` (default: build on first use)")
    parser.add_argument("--sag-layer", default=MID_BLOCK_LAYER, metavar="PATH",
                        help=f"self-attention layer SAG reads; engine backends export it (default: {MID_BLOCK_LAYER}; "
                             "e.g. up_blocks.1.attentions.0.transformer_blocks.0.attn1)")


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


def backend_options(args, backend: str) -> dict:
    """Options of the chosen backend (resolved: not 'auto') given on the command line, for that backend only."""
    options = {"onnxruntime": {"providers": args.provider, "export_dir": args.export_dir},
               "tensorrt": {"engine_dir": getattr(args, "engine_dir", None)},
               "openvino": {"export_dir": args.export_dir, "precision": getattr(args, "precision", None)}}.get(backend, {})
    return {key: value for key, value in options.items() if value is not None}


def open_pipeline(args, backend: str | None = None, **extra_options):
    """The pipeline of --model/--backend/--device/--dtype/--sag-layer and the backend's options, with the
    model's own scheduler."""
    from sagrt.runtime.backends import resolve_auto
    from sagrt.runtime.pipeline import SAGPipeline

    backend = resolve_auto(backend or args.backend)  # once: probing for TensorRT and a GPU takes a while
    return SAGPipeline.from_pretrained(args.model, backend=backend, device=args.device,
                                       torch_dtype=DTYPES[args.dtype], safety_checker=not args.no_safety_checker,
                                       sag_layer=args.sag_layer, **backend_options(args, backend), **extra_options)


def load_pipeline(args, backend: str | None = None, **extra_options):
    """open_pipeline with the scheduler of --scheduler/--karras-sigmas."""
    from sagrt.runtime.schedulers import make_scheduler

    pipe = open_pipeline(args, backend, **extra_options)
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
