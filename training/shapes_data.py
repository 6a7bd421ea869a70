"""The synthetic captioned shapes data set: one flat shape on a flat background, drawn in torch.

Every sample is (image [3, 64, 64] in [-1, 1], shape index, colour index, background index); the
caption names the shape's colour and kind and the background colour, e.g.
"a red circle on a blue background". Drawing is vectorised over the batch from signed distances,
with a one-pixel soft edge, so a batch of thousands takes well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215), "yellow": (240, 210, 30),
    "purple": (135, 50, 175), "orange": (245, 135, 25), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
CAPTION_WORDS = ("a", "on", "background", *SHAPES, *COLOUR_NAMES)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, SIZE, SIZE) in [-1, 1]
    shape: torch.Tensor  # (B,) index into SHAPES
    colour: torch.Tensor  # (B,) index into COLOUR_NAMES
    background: torch.Tensor  # (B,) index into COLOUR_NAMES, never equal to colour


def caption(shape: int, colour: int, background: int | None = None) -> str:
    """"a red circle on a blue background", or "a red circle" without a background."""
    text = f"a {COLOUR_NAMES[colour]} {SHAPES[shape]}"
    return text if background is None else f"{text} on a {COLOUR_NAMES[background]} background"


def signed_distance(kind: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of each sample's shape centred at the origin, radius r.

    kind: (B,), x and y: (B, H, W) pixel offsets from the centre (y grows downwards), r: (B, 1, 1)."""
    ax, ay = x.abs(), y.abs()
    circle = torch.sqrt(x * x + y * y) - r
    square = torch.maximum(ax, ay) - 0.85 * r
    t = 1.2 * r  # equilateral triangle pointing up, circumradius t, centred on its centroid
    triangle = torch.maximum(ay * 0 + y - 0.5 * t, math.sqrt(3) / 2 * ax - 0.5 * y - 0.5 * t)
    arm = 0.35 * r
    cross = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ay - r, ax - arm))
    stacked = torch.stack([circle, square, triangle, cross], dim=1)  # (B, 4, H, W)
    return stacked.gather(1, kind.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[1:])).squeeze(1)


def draw(shape: torch.Tensor, colour: torch.Tensor, background: torch.Tensor, generator: torch.Generator,
         jitter: float = 12.0) -> torch.Tensor:
    """Images (B, 3, SIZE, SIZE) in [-1, 1] for the given classes, random size, place and colour jitter."""
    n = shape.shape[0]
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (8, 3)
    radius = 9 + 12 * torch.rand(n, generator=generator)  # 9..21 px
    lo, span = radius + 3, SIZE - 2 * (radius + 3)
    cx = lo + span * torch.rand(n, generator=generator)
    cy = lo + span * torch.rand(n, generator=generator)
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    x = grid.view(1, 1, SIZE) - cx.view(n, 1, 1)
    y = grid.view(1, SIZE, 1) - cy.view(n, 1, 1)
    sdf = signed_distance(shape, x.expand(n, SIZE, SIZE), y.expand(n, SIZE, SIZE), radius.view(n, 1, 1))
    cover = (0.5 - sdf).clamp(0, 1).unsqueeze(1)  # (B, 1, H, W), soft one-pixel edge
    fg = palette[colour] + jitter * (2 * torch.rand(n, 3, generator=generator) - 1)
    bg = palette[background] + jitter * (2 * torch.rand(n, 3, generator=generator) - 1)
    image = cover * fg.view(n, 3, 1, 1) + (1 - cover) * bg.view(n, 3, 1, 1)
    return (image.clamp(0, 255) / 127.5 - 1)


def sample(n: int, generator: torch.Generator) -> Batch:
    """n random samples: uniform shape and colour, background uniform among the other colours."""
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    colour = torch.randint(len(COLOUR_NAMES), (n,), generator=generator)
    offset = torch.randint(1, len(COLOUR_NAMES), (n,), generator=generator)
    background = (colour + offset) % len(COLOUR_NAMES)
    return Batch(draw(shape, colour, background, generator), shape, colour, background)


def captions(batch: Batch, generator: torch.Generator, p_short: float = 0.2, p_empty: float = 0.1) -> list[str]:
    """A caption per sample: empty with p_empty (for classifier-free guidance), without the background
    with p_short, else the full caption."""
    u = torch.rand(len(batch.shape), generator=generator).tolist()
    out = []
    for i, ui in enumerate(u):
        s, c, b = int(batch.shape[i]), int(batch.colour[i]), int(batch.background[i])
        out.append("" if ui < p_empty else caption(s, c, None if ui < p_empty + p_short else b))
    return out


def to_pil(images: torch.Tensor):
    """PIL images from a (B, 3, H, W) tensor in [-1, 1]."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list, columns: int):
    """One PIL image tiling equally sized PIL images, row by row."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * w, (i // columns) * h))
    return out
