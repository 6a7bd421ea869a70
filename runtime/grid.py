"""Labelled image grids and SAG mask overlays, for `sagrt compare`."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MASK_COLOR = (255, 0, 0)
PAD = 4  # pixels around a label


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Tints the image red where the (h, w) bool mask is set, nearest-resized to the image."""
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    tint = Image.new("RGB", image.size, MASK_COLOR)
    weight = mask_image.point(lambda value: int(value * alpha))  # 0 outside the mask, alpha*255 inside
    return Image.composite(tint, image.convert("RGB"), weight)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def label_bands(row_labels: list[str], col_labels: list[str]) -> tuple[int, int]:
    """(width of the row-label band on the left, height of the column-label band on top)."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [_text_size(draw, text, font) for text in row_labels + col_labels]
    width = max(w for w, _ in sizes[:len(row_labels)]) + 2 * PAD
    height = max(h for _, h in sizes) + 2 * PAD
    return width, height


def image_grid(tiles: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """One image: tiles[row][col] laid out in a grid, row labels on the left, column labels on top.
    All tiles have the size of tiles[0][0]."""
    if len(tiles) != len(row_labels) or any(len(row) != len(col_labels) for row in tiles):
        raise ValueError(f"need {len(row_labels)} rows of {len(col_labels)} tiles")
    tile_w, tile_h = tiles[0][0].size
    left, top = label_bands(row_labels, col_labels)
    grid = Image.new("RGB", (left + tile_w * len(col_labels), top + tile_h * len(row_labels)), BACKGROUND)
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for col, text in enumerate(col_labels):
        draw.text((left + col * tile_w + PAD, PAD), text, fill=INK, font=font)
    for row, text in enumerate(row_labels):
        draw.text((PAD, top + row * tile_h + PAD), text, fill=INK, font=font)
        for col, tile in enumerate(tiles[row]):
            grid.paste(tile.convert("RGB"), (left + col * tile_w, top + row * tile_h))
    return grid
