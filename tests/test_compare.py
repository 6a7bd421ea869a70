"""sagrt compare: one labelled grid PNG, rows schedulers, columns SAG scales, optional SAG mask overlay."""

import numpy as np
import pytest
import torch
from PIL import Image

from sagrt.runtime.cli import main
from sagrt.runtime.grid import BACKGROUND, label_bands

SCHEDULERS = ["ddim", "euler"]
SCALES = ["0", "1"]


def compare(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["compare", "--model", "tiny", "a photo of a cat", "--schedulers", ",".join(SCHEDULERS),
               "--sag-scales", ",".join(SCALES),
               "--steps", "2", "--height", "64", "--width", "96", "--backend", "torch", "--out", str(out), *extra])
    return rc, out


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    plain = compare(tmp_path, "grid.png")
    masked = compare(tmp_path, "mask.png", "--show-mask", "1")
    return plain, masked


def test_grid_has_rows_by_columns_tiles_and_labels(grids):
    (rc, out), _ = grids
    assert rc == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    left, top = label_bands(SCHEDULERS, [f"sag {s}" for s in SCALES])
    assert grid.shape == (top + len(SCHEDULERS) * 64, left + len(SCALES) * 96, 3)
    background = np.array(BACKGROUND, dtype=np.uint8)
    assert (grid[:top, left:] != background).any()  # column labels written in the top band
    assert (grid[top:, :left] != background).any()  # row labels written in the left band
    for row in range(len(SCHEDULERS)):  # each row label sits beside its own row
        assert (grid[top + row * 64:top + (row + 1) * 64, :left] != background).any()
    tiles = [grid[top + r * 64:top + (r + 1) * 64, left + c * 96:left + (c + 1) * 96]
             for r in range(len(SCHEDULERS)) for c in range(len(SCALES))]
    assert all(tile.std() > 0 for tile in tiles)  # images, not empty tiles
    assert not np.array_equal(tiles[0], tiles[1])  # SAG scale 0 vs 1 differ
    assert not np.array_equal(tiles[0], tiles[2])  # DDIM vs Euler differ
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary file


def loop_masks(scheduler: str, scale: float, step: int) -> np.ndarray:
    """The SAG mask the loop reads at `step` of compare's run of one cell, as (64, 96) pixels: the score of the
    step's CFG call (batch 2), unconditional half, above the default threshold 1.0, each map cell covering 16x16
    pixels (a 4x6 map on the 8x12 latent of 64x96 pixels)."""
    from sagrt.runtime import SAGPipeline
    from sagrt.runners import UNetRecorder

    pipe = SAGPipeline.from_pretrained("tiny", backend="torch", scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.runners = UNetRecorder(pipe.runners, lambda sample, noise_pred, score: score)
    pipe("a photo of a cat", height=64, width=96, num_inference_steps=2, guidance_scale=7.5, sag_scale=scale,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    cfg_scores = [score for score in pipe.runners.calls if score.shape[0] == 2]
    cell_mask = (cfg_scores[step][0] > 1.0).numpy()
    assert cell_mask.shape == (4, 6)
    return np.kron(cell_mask, np.ones((16, 16), dtype=bool))


def test_show_mask_tints_exactly_the_masked_positions(grids):
    (_, plain_out), (rc, masked_out) = grids
    assert rc == 0
    plain = np.asarray(Image.open(plain_out).convert("RGB")).astype(int)
    masked = np.asarray(Image.open(masked_out).convert("RGB")).astype(int)
    assert plain.shape == masked.shape
    left, top = label_bands(SCHEDULERS, [f"sag {s}" for s in SCALES])
    assert np.array_equal(plain[:top], masked[:top]) and np.array_equal(plain[:, :left], masked[:, :left])
    fractions = []
    for r, scheduler in enumerate(SCHEDULERS):
        for c, scale in enumerate(SCALES):
            window = np.s_[top + r * 64:top + (r + 1) * 64, left + c * 96:left + (c + 1) * 96]
            mask = loop_masks(scheduler, float(scale), step=1)
            fractions.append(mask.mean())
            assert np.array_equal(masked[window][~mask], plain[window][~mask])  # untouched outside the mask
            # inside: 45% red over the image (PIL's composite, rounded)
            tinted = plain[window][mask] * (1 - 114 / 255) + np.array([255, 0, 0]) * (114 / 255)
            assert np.abs(masked[window][mask] - tinted).max() <= 1
    assert 0 < np.mean(fractions) < 1, fractions  # the masks are neither empty nor full


@pytest.mark.parametrize("extra, message", [
    (["--sag-scales", "0,abc"], "--sag-scales '0,abc' must be comma-separated numbers"),
    (["--sag-scales", "0,-1"], "every scale must be >= 0"),
    (["--show-mask", "5"], "--show-mask 5 must be a step in 0..1"),
    (["--schedulers", "ddim,nope"], "unknown scheduler 'nope'"),
    (["--schedulers", "ddim", "--karras-sigmas"], "scheduler 'ddim' has no Karras sigmas option"),
])
def test_bad_input_exits_2_in_one_line(tmp_path, capsys, extra, message):
    rc, out = compare(tmp_path, "bad.png", *extra)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("sagrt compare: error: ") and message in lines[0], err
    assert not out.exists()
