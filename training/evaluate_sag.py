"""Does SAG make the `shapes` model's images better? A small table in the spirit of the SAG paper's.

For every (scheduler, guidance scale, sag_scale) the same fixed prompts and seeds are generated, and the
trained shapes classifier (training/shapes_classifier.py) scores them:

- prompt adherence: how often the classifier reads the prompt's shape, shape colour, background colour,
  and all three at once;
- FD: the Frechet distance between the classifier's pooled features of the generated images and of real
  data-set images of the same prompts (lower is closer to the data), as FID does with Inception features;
  the features are first projected on the 16 principal axes of the real features, so that a few dozen
  images estimate the covariances. The FD of a second draw of real images gives the floor.

Run from the checkout root: python -m training.evaluate_sag   (writes benchmarks/RESULTS-shapes.md and
benchmarks/shapes-sag-grid.png; see --help)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training import shapes_classifier
from training.shapes_data import COLOUR_NAMES, SHAPES, caption, draw, grid, to_pil

ROOT = Path(__file__).resolve().parent.parent
SAG_SCALES = (0.0, 0.5, 0.75, 1.0)
GUIDANCE = (3.0, 7.5)
SCHEDULERS = ("ddim", "euler-a")


@dataclass(frozen=True)
class Prompt:
    shape: int
    colour: int
    background: int

    @property
    def text(self) -> str:
        return caption(self.shape, self.colour, self.background)


def fixed_prompts(count: int = 32) -> list[Prompt]:
    """`count` prompts cycling through the shapes, colours and every background offset (never the shape's
    own colour), the same on every run."""
    n_s, n_c = len(SHAPES), len(COLOUR_NAMES)
    return [Prompt(i % n_s, (i // n_s) % n_c, ((i // n_s) % n_c + 1 + i % (n_c - 1)) % n_c) for i in range(count)]


def generate(pipe, prompts: list[Prompt], seeds: list[int], **call) -> tuple[torch.Tensor, list[Prompt]]:
    """Images (N, 3, 64, 64) in [-1, 1] for every (seed, prompt), one pipeline call per seed; the initial
    latents and the scheduler's noise follow from the seed alone."""
    images, labels = [], []
    for seed in seeds:
        out = pipe([p.text for p in prompts], generator=torch.Generator().manual_seed(seed), output_type="pt",
                   **call).images
        images.append(out.float().cpu() * 2 - 1)
        labels += prompts
    return torch.cat(images), labels


def adherence(classifier, images: torch.Tensor, labels: list[Prompt]) -> dict[str, float]:
    """Fractions of images whose predicted shape, colour, background (and all three) match the prompt."""
    with torch.no_grad():
        out = classifier(images)
    hits = {name: out[name].argmax(1) == torch.tensor([getattr(p, name) for p in labels])
            for name in ("shape", "colour", "background")}
    hits["all"] = hits["shape"] & hits["colour"] & hits["background"]
    return {name: hit.float().mean().item() for name, hit in hits.items()}


def real_images(labels: list[Prompt], seed: int = 1234) -> torch.Tensor:
    """Data-set images of the given prompts (random size, place and colour jitter)."""
    gen = torch.Generator().manual_seed(seed)
    pick = {name: torch.tensor([getattr(p, name) for p in labels]) for name in ("shape", "colour", "background")}
    return draw(pick["shape"], pick["colour"], pick["background"], gen)


def features(classifier, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return classifier.features(images).double().numpy()


class FrechetJudge:
    """FD against a fixed set of real features, in the space of their `dims` principal axes."""

    def __init__(self, real: np.ndarray, dims: int = 16):
        self.mean = real.mean(0)
        _, _, vt = np.linalg.svd(real - self.mean, full_matrices=False)
        self.axes = vt[:dims].T  # (D, dims)
        self.real = self.project(real)

    def project(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.mean) @ self.axes

    def __call__(self, feats: np.ndarray) -> float:
        return frechet_distance(self.project(feats), self.real)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (N, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def evaluate(model: str, backend: str, prompts: list[Prompt], seeds: list[int], steps: int):
    """Rows (scheduler, guidance, sag_scale, adherence..., FD, seconds) and the first seed's images per row."""
    from sagrt.runtime.pipeline import SAGPipeline

    classifier = shapes_classifier.load()
    labels = [p for _ in seeds for p in prompts]
    judge = FrechetJudge(features(classifier, real_images(labels * 4)))
    second_draw = real_images(labels, seed=99)
    floor = dict(scheduler="real images", guidance=float("nan"), sag_scale=float("nan"),
                 **adherence(classifier, second_draw, labels), fd=judge(features(classifier, second_draw)))
    rows, firsts = [], []
    for scheduler in SCHEDULERS:
        pipe = SAGPipeline.from_pretrained(model, backend=backend, scheduler=scheduler, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for guidance, sag_scale in itertools.product(GUIDANCE, SAG_SCALES):
            start = time.perf_counter()
            images, labels = generate(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=guidance,
                                      sag_scale=sag_scale)
            fd = judge(features(classifier, images))
            rows.append(dict(scheduler=scheduler, guidance=guidance, sag_scale=sag_scale,
                             **adherence(classifier, images, labels), fd=fd,
                             seconds=time.perf_counter() - start))
            firsts.append(images[: len(prompts)])
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows, firsts, floor


def format_row(row: dict) -> str:
    cells = [row["scheduler"], f"{row['guidance']:g}", f"{row['sag_scale']:g}",
             *(f"{row[k]:.3f}" for k in ("shape", "colour", "background", "all")), f"{row['fd']:.2f}"]
    return "| " + " | ".join(cells).replace("nan", "-") + " |"


def table(rows: list[dict]) -> str:
    head = ("| scheduler | guidance | sag_scale | shape acc | colour acc | background acc | all three | FD |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [format_row(row) for row in rows])


def sag_summary(rows: list[dict]) -> str:
    """Per (scheduler, guidance): the best sag_scale by FD, and how FD and all-three accuracy move from
    sag_scale 0 to the default 0.75."""
    lines = []
    for scheduler, guidance in itertools.product(SCHEDULERS, GUIDANCE):
        group = {r["sag_scale"]: r for r in rows if r["scheduler"] == scheduler and r["guidance"] == guidance}
        if 0.0 not in group or 0.75 not in group:
            continue
        off, on = group[0.0], group[0.75]
        best = min(group.values(), key=lambda r: r["fd"])
        lines.append(f"- {scheduler}, guidance {guidance:g}: FD {off['fd']:.2f} -> {on['fd']:.2f} at sag_scale "
                     f"0.75 (lowest at sag_scale {best['sag_scale']:g}), all-three accuracy {off['all']:.3f} -> "
                     f"{on['all']:.3f}")
    return "\n".join(lines)


def picture_grid(firsts: list[torch.Tensor], prompts_shown: int, path: Path) -> None:
    """One row per table row: the first seed's images of the first prompts."""
    tiles = [pil for batch in firsts for pil in to_pil(batch[:prompts_shown])]
    grid(tiles, prompts_shown).save(path)


def page(rows, floor, args, prompts, minutes: float, load: float) -> str:
    command = "python -m training.evaluate_sag " + " ".join(sys.argv[1:])
    shown = ", ".join(f'"{p.text}"' for p in prompts[:4])
    return f"""# SAG on the trained `shapes` model

Made by `{command.strip()}` ({minutes:.0f} min, {args.threads} torch threads, load average {load:.2f} at
the start; backend {args.backend}, {args.steps} steps, {len(prompts)} prompts x {args.seeds} seeds = {len(prompts) * args.seeds}
images per row, the same prompts and seeds in every row).

The judge is the classifier trained with the model (training/shapes_classifier.py). Accuracies are the
fraction of images whose shape, shape colour, background colour, or all three, the classifier reads as
the prompt says (chance: 0.25, 0.125, 0.143, 0.0045). FD is the Frechet distance of the classifier's
features (projected on the 16 principal axes of the real features) to real data-set images of the same
prompts; lower is closer. The first row is a second draw of real images: the floor FD can reach at this
sample size. With {len(prompts) * args.seeds} images an accuracy has a standard error of about
{0.5 / (len(prompts) * args.seeds) ** 0.5:.3f} at most.

{table([floor] + rows)}

Per scheduler and guidance scale:

{sag_summary(rows)}

![grid](shapes-sag-grid.png)

`shapes-sag-grid.png`: one row per table row (without the real-images row), in order; the first
{min(16, len(prompts))} prompts, seed 0. Prompts start with {shown}.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-shapes.md")
    parser.add_argument("--grid", type=Path, default=ROOT / "benchmarks" / "shapes-sag-grid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts, seeds = fixed_prompts(args.prompts), list(range(args.seeds))
    start, load = time.time(), os.getloadavg()[0]
    rows, firsts, floor = evaluate(args.model, args.backend, prompts, seeds, args.steps)
    picture_grid(firsts, min(16, len(prompts)), args.grid)
    args.out.write_text(page(rows, floor, args, prompts, (time.time() - start) / 60, load))
    print(table([floor] + rows))
    print(sag_summary(rows))


if __name__ == "__main__":
    main()
