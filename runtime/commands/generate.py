"""sagrt generate PROMPT: images with SAG, a progress bar over the steps and a timing summary."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from sagrt.errors import SagrtError
from sagrt.runtime.checks import integer, real, seeded_generator
from sagrt.runtime.commands.common import (PICTURE_MODEL, add_model_arguments, add_sampling_arguments, load_pipeline,
                                           sag_config, save_image_atomic, writable_dir)


def add_arguments(parser):
    parser.add_argument("prompt", nargs="?", default="a red circle on a blue background")
    add_model_arguments(parser, default_model=PICTURE_MODEL)
    add_sampling_arguments(parser)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument("--out", default="sagrt-out", help="output folder for the PNG files (default: sagrt-out)")


def generate(pipe, args, sag):
    return pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, sag_scale=args.sag_scale, negative_prompt=args.negative_prompt,
                num_images_per_prompt=args.num_images, generator=seeded_generator(args.seed), sag=sag)


def run(args) -> int:
    sag = sag_config(args)
    # what can be checked without the model is checked before it loads (an export on first use takes a while)
    seeded_generator(args.seed)
    real("--guidance-scale", args.guidance_scale)
    real("--sag-scale", args.sag_scale)
    integer("--steps", args.steps, low=1)
    if args.num_images < 1:
        raise SagrtError(f"--num-images must be >= 1, got {args.num_images}")
    created = not Path(args.out).exists()
    out = writable_dir(args.out)
    try:
        start = time.perf_counter()
        pipe = load_pipeline(args)
        load_s = time.perf_counter() - start
        result = generate(pipe, args, sag)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave nothing behind for a run that produced nothing
        raise
    paths = [save_new_png(image, out, f"sagrt-{args.seed}-{i}") for i, image in enumerate(result.images)]
    t = pipe.timings
    flagged = sum(result.nsfw_content_detected or [])
    kept = [p.name for i, p in enumerate(paths) if p.name != f"sagrt-{args.seed}-{i}.png"]
    print(f"wrote {len(paths)} image(s) to {out}/" + (f" ({flagged} flagged by the safety checker)" if flagged else "")
          + (f" ({', '.join(kept)}: numbered past existing files, which were kept)" if kept else ""))
    calls = f" ({len(t.steps)} UNet iterations)" if len(t.steps) != args.steps else ""
    print(f"backend {pipe.runners.name}, {pipe.scheduler.__class__.__name__}, {args.steps} steps{calls}, "
          f"{result.images[0].width}x{result.images[0].height}")
    print(f"model load {load_s:.2f} s | text {t.text * 1e3:.1f} ms | step median "
          f"{statistics.median(t.steps) * 1e3:.1f} ms | decode {t.decode * 1e3:.1f} ms | total {t.total:.2f} s")
    return 0


def save_new_png(image, folder: Path, stem: str) -> Path:
    """Saves `image` as folder/stem.png, or stem-2.png, stem-3.png... when that name is taken: an image of an
    earlier run is never overwritten."""
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    save_image_atomic(image, path)
    return path
