"""Does SAG make the `shapes` model's images better? A small table in the spirit of the SAG paper's.

For every (scheduler, guidance scale, sag_scale) the same fixed prompts and seeds are generated, and the
trained shapes classifier (training/shapes_classifier.py) scores them:

- prompt adherence: how often the classifier reads the prompt's shape, shape colour, background colour,
  and all three at once;
- FD: the Frechet distance between the classifier's pooled features of the generated images and of real
  data-set images of the same prompts (lower is closer to the data), as FID does with Inception features.

Run from the checkout root: python -m training.evaluate_sag   (writes benchmarks/RESULTS-shapes.md and
benchmarks/shapes-sag-grid.png; see --help)
"""

from __future__ import annotations

import argparse
import itertools
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
    real = None
    rows, firsts = [], []
    for scheduler in SCHEDULERS:
        pipe = SAGPipeline.from_pretrained(model, backend=backend, scheduler=scheduler, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for guidance, sag_scale in itertools.product(GUIDANCE, SAG_SCALES):
            start = time.perf_counter()
            images, labels = generate(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=guidance,
                                      sag_scale=sag_scale)
            if real is None:
                real = features(classifier, real_images(labels))
            fd = frechet_distance(features(classifier, images), real)
            rows.append(dict(scheduler=scheduler, guidance=guidance, sag_scale=sag_scale,
                             **adherence(classifier, images, labels), fd=fd,
                             seconds=time.perf_counter() - start))
            firsts.append(images[: len(prompts)])
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    real_adherence = adherence(classifier, real_images(labels, seed=99), labels)
    return rows, firsts, real_adherence


def format_row(row: dict) -> str:
    return (f"| {row['scheduler']} | {row['guidance']:g} | {row['sag_scale']:g} | {row['shape']:.3f} | "
            f"{row['colour']:.3f} | {row['background']:.3f} | {row['all']:.3f} | {row['fd']:.2f} |")


def table(rows: list[dict]) -> str:
    head = ("| scheduler | guidance | sag_scale | shape acc | colour acc | background acc | all three | FD |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [format_row(row) for row in rows])


def picture_grid(firsts: list[torch.Tensor], rows: list[dict], prompts_shown: int, path: Path) -> None:
    """One row per table row: the first seed's images of the first prompts."""
    tiles = [pil for batch in firsts for pil in to_pil(batch[:prompts_shown])]
    grid(tiles, prompts_shown).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-shapes.md")
    parser.add_argument("--grid", type=Path, default=ROOT / "benchmarks" / "shapes-sag-grid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts, seeds = fixed_prompts(args.prompts), list(range(args.seeds))
    start = time.time()
    rows, firsts, real = evaluate(args.model, args.backend, prompts, seeds, args.steps)
    picture_grid(firsts, rows, min(16, len(prompts)), args.grid)
    args.out.write_text(table(rows) + "\n")
    print(table(rows))
    print(f"real images: {real}; {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
