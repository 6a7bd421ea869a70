"""sagrt parity --backends A,B: runs the same SAG generation on two backends and prints, per step, the
relative error of A against B (the reference) for noise_pred and latents, and how many SAG mask positions
differ. Exits 1 when an error passes the docs/design.md bounds (per call 1e-4, final latents 1e-3).

--precision applies to backend A (under test); the reference B runs at its default precision. Where A runs in
bf16 the bound is relative (docs/design.md): A's images must be at least as close to B's (mean PSNR over
--psnr-seeds) as those of diffusers' modules run eagerly in torch bf16 with the same seeds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import torch

from sagrt.errors import SagrtError
from sagrt.runtime.backends import BACKEND_NAMES, resolve_backend
from sagrt.runtime.commands.common import (OPTION_FLAGS, add_model_arguments, add_sampling_arguments, backend_options,
                                           load_pipeline, sag_config)
from sagrt.runtime.checks import seeded_generator
from sagrt.metrics import psnr_db, relative_error
from sagrt.runners import UNetRecorder

NOISE_BOUND = 1e-4  # per UNet call, docs/design.md numerical contract
LATENT_BOUND = 1e-3  # final latents after the whole loop


@dataclass
class Step:
    """What one denoising step produced: its UNet calls (main pass first, then the degraded pass) and latents."""

    t: float
    latents: torch.Tensor
    calls: list = field(default_factory=list)


def record_run(pipe, args, sag) -> tuple[list[Step], torch.Tensor]:
    """Runs the pipeline's own loop and splits the recorded UNet calls by step (through its callback); also returns
    the images ([N, H, W, 3] in [0, 1])."""
    # a CPU float32 copy of every UNet call's (noise_pred, attn_score)
    recorder = UNetRecorder(pipe.runners, lambda sample, noise_pred, score: (noise_pred.float().cpu(),
                                                                             score.float().cpu()))
    pipe.runners = recorder
    steps: list[Step] = []

    def on_step(index, t, latents):
        done = sum(len(step.calls) for step in steps)
        steps.append(Step(float(t), latents.float().cpu(), recorder.calls[done:]))

    pipe.set_progress_bar_config(disable=True)
    images = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, sag_scale=args.sag_scale, negative_prompt=args.negative_prompt,
                  num_images_per_prompt=args.num_images, generator=seeded_generator(args.seed),
                  output_type="np", callback=on_step, sag=sag).images
    return steps, torch.as_tensor(images)


def mask_differences(score_a: torch.Tensor, score_b: torch.Tensor, threshold: float, cfg: bool) -> tuple[int, int]:
    """(positions whose SAG mask differs, positions) on the score the loop reads (the unconditional half with CFG)."""
    if cfg:
        score_a, score_b = score_a.chunk(2)[0], score_b.chunk(2)[0]
    mask_a, mask_b = score_a > threshold, score_b > threshold
    return int((mask_a != mask_b).sum()), mask_a.numel()


def mask_agreement(rows: list[dict]) -> float:
    """Fraction of SAG mask positions, over all steps, on which the two backends agree (an fp16 score near the
    threshold can fall on the other side of it)."""
    differ, total = (sum(row["mask_diff"][i] for row in rows) for i in (0, 1))
    return 1.0 - differ / total if total else 1.0


def compare_steps(steps_a: list[Step], steps_b: list[Step], threshold: float, cfg: bool) -> list[dict]:
    """One row per step: errors of A against B."""
    if len(steps_a) != len(steps_b):
        raise SagrtError(f"the backends ran {len(steps_a)} and {len(steps_b)} steps: not comparable")
    rows = []
    for i, (a, b) in enumerate(zip(steps_a, steps_b)):
        row = {"step": i, "t": b.t, "noise_pred": relative_error(a.calls[0][0], b.calls[0][0]),
               "noise_degraded": None, "latents": relative_error(a.latents, b.latents),
               "mask_diff": mask_differences(a.calls[0][1], b.calls[0][1], threshold, cfg)}
        if len(a.calls) > 1 and len(b.calls) > 1:
            row["noise_degraded"] = relative_error(a.calls[1][0], b.calls[1][0])
        rows.append(row)
    return rows


def add_arguments(parser):
    parser.add_argument("prompt", nargs="?", default="a photo of an astronaut riding a horse")
    add_model_arguments(parser, backend_choice=False)
    add_sampling_arguments(parser)
    parser.set_defaults(steps=20)
    parser.add_argument("--backends", default="onnxruntime,torch", metavar="A,B",
                        help="backend under test and reference backend (default: onnxruntime,torch)")
    parser.add_argument("--num-images", type=int, default=2, help="images per prompt (default: 2)")
    parser.add_argument("--noise-bound", type=float, default=NOISE_BOUND,
                        help=f"largest relative error of a step's noise_pred (default: {NOISE_BOUND:g})")
    parser.add_argument("--psnr-seeds", type=parse_seeds, default=[0, 1, 2, 3], metavar="S,S,...",
                        help="bf16: seeds whose mean image PSNR is compared with eager torch bf16's "
                             "(default: 0,1,2,3)")
    parser.add_argument("--latent-bound", type=float, default=LATENT_BOUND,
                        help=f"largest relative error of the final latents (default: {LATENT_BOUND:g})")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise argparse.ArgumentTypeError("name at least one seed")
    return seeds


def parse_backends(text: str) -> tuple[str, str]:
    names = [part.strip() for part in text.split(",")]
    if len(names) != 2 or any(name not in BACKEND_NAMES for name in names):
        raise SagrtError(f"--backends {text!r} must name two backends A,B from {', '.join(BACKEND_NAMES)}")
    return names[0], names[1]


def split_options(given: dict, names: tuple[str, str]) -> dict[str, dict]:
    """Each backend gets the options it takes, except precision: the backend under test's alone (the reference
    runs at its own default); an option neither takes is refused."""
    taken = {name: {f.name for f in fields(resolve_backend(name).options)} for name in names}
    for key in given:
        if not any(key in fields for fields in taken.values()):
            raise SagrtError(f"{OPTION_FLAGS[key]} is taken by neither {names[0]} nor {names[1]}")
    split = {name: {key: value for key, value in given.items() if key in taken[name]} for name in names}
    split[names[1]].pop("precision", None)
    return split


def format_row(row: dict) -> str:
    degraded = "-" if row["noise_degraded"] is None else f"{row['noise_degraded']:.2e}"
    differ, total = row["mask_diff"]
    return (f"{row['step']:>4}  {row['t']:>8.2f}  {row['noise_pred']:>10.2e}  {degraded:>10}  "
            f"{row['latents']:>10.2e}  {differ:>5}/{total}")


EAGER_BF16 = "eager bf16"  # the yardstick of a bf16 backend: diffusers' modules in torch bf16


def run(args) -> int:
    backend_a, backend_b = parse_backends(args.backends)
    sag = sag_config(args)
    options = split_options(backend_options(args), (backend_a, backend_b))
    relative = options[backend_a].get("precision") == "bf16"
    runs = {backend_a: (backend_a, options[backend_a]), backend_b: (backend_b, options[backend_b])}
    if relative:
        runs[EAGER_BF16] = ("torch", {"precision": "bf16"})
    seeds = [args.seed] + ([seed for seed in args.psnr_seeds if seed != args.seed] if relative else [])
    steps, images = {}, {}
    for label, (name, run_options) in runs.items():
        pipe = load_pipeline(args, backend=name, options=run_options)
        for seed in seeds:  # the table shows the first seed's steps; the bf16 bound reads every seed's images
            seed_steps, images[label, seed] = record_run(pipe, argparse.Namespace(**{**vars(args), "seed": seed}), sag)
            steps.setdefault(label, seed_steps)
        pipe.runners.close()
    cfg = args.guidance_scale > 1.0
    rows = compare_steps(steps[backend_a], steps[backend_b], sag.threshold, cfg)
    precision = " (bf16)" if relative else ""
    print(f"{backend_a}{precision} against {backend_b}: model {args.model}, {args.steps} steps, guidance "
          f"{args.guidance_scale}, sag_scale {args.sag_scale}, {args.num_images} image(s), seed {args.seed}")
    print(f"{'step':>4}  {'t':>8}  {'noise_pred':>10}  {'noise_deg':>10}  {'latents':>10}  mask_diff")
    for row in rows:
        print(format_row(row))
    worst_noise = max(row["noise_pred"] for row in rows)
    final = rows[-1]["latents"]
    flipped = sum(row["mask_diff"][0] for row in rows)
    if relative:
        return relative_verdict(steps, images, seeds, backend_a, backend_b, sag.threshold, cfg, flipped, final)
    agreement = mask_agreement(rows)
    failures = []
    if worst_noise > args.noise_bound:
        failures.append(f"noise_pred error {worst_noise:.2e} > {args.noise_bound:g}")
    if final > args.latent_bound:
        failures.append(f"final latents error {final:.2e} > {args.latent_bound:g}")
    verdict = "FAIL: " + "; ".join(failures) if failures else "ok"
    print(f"worst noise_pred {worst_noise:.2e} (bound {args.noise_bound:g}), final latents {final:.2e} "
          f"(bound {args.latent_bound:g}), SAG mask agreement {agreement:.4%} ({flipped} position(s) differ): {verdict}")
    return 1 if failures else 0


def relative_verdict(steps, images, seeds, backend_a, backend_b, threshold, cfg, flipped, final) -> int:
    """bf16: A passes when its images are at least as close to B's as the eager bf16 run's are (mean PSNR over
    the seeds)."""
    eager_rows = compare_steps(steps[EAGER_BF16], steps[backend_b], threshold, cfg)
    eager_flipped = sum(row["mask_diff"][0] for row in eager_rows)

    def mean_psnr(label):
        return sum(psnr_db(images[label, seed], images[backend_b, seed]) for seed in seeds) / len(seeds)

    psnr_a, psnr_eager = mean_psnr(backend_a), mean_psnr(EAGER_BF16)
    ok = psnr_a >= psnr_eager
    print(f"{EAGER_BF16} against {backend_b}: final latents {eager_rows[-1]['latents']:.2e}, {eager_flipped} mask "
          f"position(s) differ; image PSNR {psnr_eager:.2f} dB (mean over seeds {','.join(map(str, seeds))})")
    print(f"{backend_a} (bf16): final latents {final:.2e}, {flipped} mask position(s) differ; image PSNR {psnr_a:.2f} "
          f"dB (bound: at least {EAGER_BF16}'s {psnr_eager:.2f} dB): "
          + ("ok" if ok else f"FAIL: image PSNR {psnr_a:.2f} dB < {psnr_eager:.2f} dB"))
    return 0 if ok else 1
