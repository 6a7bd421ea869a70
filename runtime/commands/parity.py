"""sagrt parity --backends A,B: runs the same SAG generation on two backends and prints, per step, the
relative error of A against B (the reference) for noise_pred and latents, and how many SAG mask positions
differ. Exits 1 when an error passes the docs/design.md bounds (per call 1e-4, final latents 1e-3)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from sagrt.errors import SagrtError
from sagrt.runtime.backends import BACKEND_NAMES, resolve_backend
from sagrt.runtime.commands.common import (OPTION_FLAGS, add_model_arguments, add_sampling_arguments, backend_options,
                                           load_pipeline, sag_config)
from sagrt.runtime.checks import seeded_generator
from sagrt.metrics import relative_error
from sagrt.runners import UNetRecorder

NOISE_BOUND = 1e-4  # per UNet call, docs/design.md numerical contract
LATENT_BOUND = 1e-3  # final latents after the whole loop


@dataclass
class Step:
    """What one denoising step produced: its UNet calls (main pass first, then the degraded pass) and latents."""

    t: float
    latents: torch.Tensor
    calls: list = field(default_factory=list)


def record_run(pipe, args, sag) -> list[Step]:
    """Runs the pipeline's own loop and splits the recorded UNet calls by step (through its callback)."""
    # a CPU float32 copy of every UNet call's (noise_pred, attn_score)
    recorder = UNetRecorder(pipe.runners, lambda sample, noise_pred, score: (noise_pred.float().cpu(),
                                                                             score.float().cpu()))
    pipe.runners = recorder
    steps: list[Step] = []

    def on_step(index, t, latents):
        done = sum(len(step.calls) for step in steps)
        steps.append(Step(float(t), latents.float().cpu(), recorder.calls[done:]))

    pipe.set_progress_bar_config(disable=True)
    pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
         guidance_scale=args.guidance_scale, sag_scale=args.sag_scale, negative_prompt=args.negative_prompt,
         num_images_per_prompt=args.num_images, generator=seeded_generator(args.seed),
         output_type="latent", callback=on_step, sag=sag)
    return steps


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
    parser.add_argument("--latent-bound", type=float, default=LATENT_BOUND,
                        help=f"largest relative error of the final latents (default: {LATENT_BOUND:g})")


def parse_backends(text: str) -> tuple[str, str]:
    names = [part.strip() for part in text.split(",")]
    if len(names) != 2 or any(name not in BACKEND_NAMES for name in names):
        raise SagrtError(f"--backends {text!r} must name two backends A,B from {', '.join(BACKEND_NAMES)}")
    return names[0], names[1]


def split_options(given: dict, names: tuple[str, str]) -> dict[str, dict]:
    """Each backend gets the options it takes; an option neither takes is refused."""
    taken = {name: {f.name for f in fields(resolve_backend(name).options)} for name in names}
    for key in given:
        if not any(key in fields for fields in taken.values()):
            raise SagrtError(f"{OPTION_FLAGS[key]} is taken by neither {names[0]} nor {names[1]}")
    return {name: {key: value for key, value in given.items() if key in taken[name]} for name in names}


def format_row(row: dict) -> str:
    degraded = "-" if row["noise_degraded"] is None else f"{row['noise_degraded']:.2e}"
    differ, total = row["mask_diff"]
    return (f"{row['step']:>4}  {row['t']:>8.2f}  {row['noise_pred']:>10.2e}  {degraded:>10}  "
            f"{row['latents']:>10.2e}  {differ:>5}/{total}")


def run(args) -> int:
    backend_a, backend_b = parse_backends(args.backends)
    sag = sag_config(args)
    steps = {}
    options = split_options(backend_options(args), (backend_a, backend_b))
    for name in (backend_a, backend_b):
        pipe = load_pipeline(args, backend=name, options=options[name])
        steps[name] = record_run(pipe, args, sag)
        pipe.runners.close()
    rows = compare_steps(steps[backend_a], steps[backend_b], sag.threshold, args.guidance_scale > 1.0)
    print(f"{backend_a} against {backend_b}: model {args.model}, {args.steps} steps, guidance {args.guidance_scale}, "
          f"sag_scale {args.sag_scale}, {args.num_images} image(s), seed {args.seed}")
    print(f"{'step':>4}  {'t':>8}  {'noise_pred':>10}  {'noise_deg':>10}  {'latents':>10}  mask_diff")
    for row in rows:
        print(format_row(row))
    worst_noise = max(row["noise_pred"] for row in rows)
    final = rows[-1]["latents"]
    flipped = sum(row["mask_diff"][0] for row in rows)
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
