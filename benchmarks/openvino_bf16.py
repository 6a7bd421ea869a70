"""bf16 closeness table for benchmarks/RESULTS-openvino.md: image PSNR against the fp32 torch reference of
openvino bf16 and of diffusers' modules run eagerly in torch bf16 (the docs/design.md yardstick), with the SAG mask
positions that differ from the reference over the whole loop and the final latents' relative error.

    python benchmarks/openvino_bf16.py --model tiny --size 64 --seeds 0,1,2,3
    python benchmarks/openvino_bf16.py --model small --size 256 --seeds 0,1,2,3

Run from the checkout's root. Times nothing: the numbers do not depend on machine load.
"""

from __future__ import annotations

import argparse
import sys

import torch


from sagrt.runtime import SAGPipeline  # noqa: E402
from sagrt.metrics import psnr_db, relative_error  # noqa: E402
from sagrt.runners import UNetRecorder  # noqa: E402

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry"
RUNS = {"torch fp32 (reference)": dict(backend="torch"),
        "eager torch bf16": dict(backend="torch", torch_dtype=torch.bfloat16),
        "openvino bf16": dict(backend="openvino", precision="bf16"),
        "openvino fp32": dict(backend="openvino", precision="fp32")}


def generate(pipe, seed: int, size: int, steps: int):
    """(images [1, S, S, 3], final latents, SAG scores of each step's main UNet call)."""
    recorder = UNetRecorder(pipe.runners, lambda sample, noise, score: score.float().cpu())
    pipe.runners, inner = recorder, pipe.runners
    latents = []
    images = pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                  sag_scale=0.75, generator=torch.Generator().manual_seed(seed), output_type="np",
                  callback=lambda i, t, x: latents.append(x.float().cpu())).images
    pipe.runners = inner
    main_calls = recorder.calls[::2] if len(recorder.calls) == 2 * steps else recorder.calls
    return torch.as_tensor(images), latents[-1], main_calls


def flips(scores, reference) -> int:
    """SAG mask positions (unconditional half, threshold 1.0) that differ from the reference, over all steps."""
    return sum(int(((a.chunk(2)[0] > 1.0) != (b.chunk(2)[0] > 1.0)).sum()) for a, b in zip(scores, reference))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--schedulers", default="ddim,euler-a")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, SAG 0.75, guidance 7.5, seeds "
          f"{args.seeds}; PSNR and latents error against torch fp32, mask flips summed over steps and seeds\n")
    print("| scheduler | run | mean PSNR dB | PSNR per seed | final latents rel. err (mean) | mask flips |")
    print("|---|---|---|---|---|---|")
    for scheduler in args.schedulers.split(","):
        results = {}
        for label, options in RUNS.items():
            pipe = SAGPipeline.from_pretrained(args.model, scheduler=scheduler, **options)
            pipe.set_progress_bar_config(disable=True)
            results[label] = [generate(pipe, seed, args.size, args.steps) for seed in seeds]
            pipe.runners.close()
        reference = results.pop("torch fp32 (reference)")
        for label, runs in results.items():
            psnrs = [psnr_db(run[0], ref[0]) for run, ref in zip(runs, reference)]
            latent_err = sum(relative_error(run[1], ref[1]) for run, ref in zip(runs, reference)) / len(seeds)
            flipped = sum(flips(run[2], ref[2]) for run, ref in zip(runs, reference))
            total = sum(ref[2][0].chunk(2)[0].numel() * len(ref[2]) for ref in reference)
            print(f"| {scheduler} | {label} | {sum(psnrs) / len(psnrs):.2f} | {', '.join(f'{p:.1f}' for p in psnrs)} "
                  f"| {latent_err:.2e} | {flipped}/{total} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
