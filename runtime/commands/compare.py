"""sagrt compare PROMPT: one grid PNG, rows schedulers, columns SAG scales, optionally with the SAG mask shown."""

from __future__ import annotations

from pathlib import Path

import torch

from sagrt.errors import SagrtError
from sagrt.runtime.checks import seeded_generator
from sagrt.runtime.commands.common import (PICTURE_MODEL, add_denoise_arguments, add_model_arguments,
                                           add_sag_arguments, open_pipeline, sag_config, save_image_atomic,
                                           writable_dir)
from sagrt.runtime.grid import image_grid, overlay_mask
from sagrt.runtime.guidance import sag_mask
from sagrt.runners import UNetRecorder
from sagrt.runtime.schedulers import canonical_name, make_scheduler, scheduler_names


def add_arguments(parser):
    parser.add_argument("prompt")
    add_model_arguments(parser, default_model=PICTURE_MODEL)
    add_denoise_arguments(parser)
    add_sag_arguments(parser)
    parser.add_argument("--sag-scales", default="0,0.5,1.0", metavar="S1,S2,...",
                        help="SAG scales, one column each (default: 0,0.5,1.0)")
    parser.add_argument("--schedulers", default=None, metavar="NAME,...",
                        help=f"schedulers, one row each, from {', '.join(scheduler_names())} (default: the model's)")
    parser.add_argument("--show-mask", type=int, default=None, metavar="STEP",
                        help="overlay the SAG mask of denoising step STEP (0-based) on each image")
    parser.add_argument("--out", required=True, help="the grid PNG to write")


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise SagrtError(f"--sag-scales {text!r} must be comma-separated numbers, e.g. 0,0.5,1.0") from None
    if any(not scale >= 0 for scale in scales):  # also refuses nan
        raise SagrtError(f"--sag-scales {text!r}: every scale must be >= 0")
    return scales


def generate_cell(pipe, args, sag, scale: float, mask_step: int | None):
    """One image at one SAG scale, and the SAG mask (h, w) of step `mask_step` (None when not asked)."""
    recorder = pipe.runners
    recorder.calls.clear()
    step_starts = []  # index of each denoising step's first UNet call, which is the full (not degraded) call

    def mark_step(step, t, latents):
        step_starts.append(len(recorder.calls))

    image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale, sag_scale=scale, negative_prompt=args.negative_prompt,
                 generator=seeded_generator(args.seed), callback=mark_step, sag=sag).images[0]
    if mask_step is None:
        return image, None
    if mask_step >= len(step_starts):
        raise SagrtError(f"--show-mask {mask_step} is past the last step: use 0..{len(step_starts) - 1}")
    score = recorder.calls[([0] + step_starts)[mask_step]]
    if args.guidance_scale > 1.0:
        score = score.chunk(2)[0]  # the unconditional half, as the loop reads it (eq. 25)
    latent_size = (image.height // pipe.info.vae_scale_factor, image.width // pipe.info.vae_scale_factor)
    mask = sag_mask(score.float(), sag.threshold, latent_size, torch.float32)[0, 0]
    return image, mask.cpu().numpy().astype(bool)


def run(args) -> int:
    sag = sag_config(args)
    scales = parse_scales(args.sag_scales)
    if args.steps < 1:
        raise SagrtError(f"--steps must be >= 1, got {args.steps}")
    if args.show_mask is not None and not 0 <= args.show_mask < args.steps:
        raise SagrtError(f"--show-mask {args.show_mask} must be a step in 0..{args.steps - 1}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise SagrtError(f"--out {args.out!r} must name a .png file")
    writable_dir(out.parent)
    names = [canonical_name(name.strip()) for name in args.schedulers.split(",")] if args.schedulers else []
    pipe = open_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    pipe.runners = UNetRecorder(pipe.runners, lambda sample, noise_pred, score: score)  # every call's SAG score
    base_config = pipe.scheduler.config
    names = names or [canonical_name(type(pipe.scheduler).__name__)]
    karras = args.karras_sigmas or None
    schedulers = [make_scheduler(name, base_config, karras_sigmas=karras) for name in names]  # all checked first
    rows = []
    for scheduler in schedulers:
        pipe.scheduler = scheduler
        row = []
        for scale in scales:
            image, mask = generate_cell(pipe, args, sag, scale, args.show_mask)
            row.append(image if mask is None else overlay_mask(image, mask))
        rows.append(row)
        print(f"{type(scheduler).__name__}: {len(scales)} image(s)")
    row_labels = [name + (" karras" if karras else "") for name in names]
    col_labels = [f"sag {scale:g}" for scale in scales]
    grid = image_grid(rows, row_labels, col_labels)
    save_image_atomic(grid, out)
    mask_note = f", SAG mask of step {args.show_mask} in red" if args.show_mask is not None else ""
    print(f"wrote {out} ({len(rows)} scheduler(s) x {len(scales)} SAG scale(s), {grid.width}x{grid.height}"
          f"{mask_note})")
    return 0
