"""sagrt compare: one labelled grid PNG, rows schedulers, columns SAG scales, optional SAG mask overlay."""

import numpy as np
import pytest
from PIL import Image

from sagrt.runtime.cli import main
from sagrt.runtime.grid import BACKGROUND, label_bands

SCHEDULERS = ["ddim", "euler"]
SCALES = ["0", "1"]


def compare(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["compare", "--model", "tiny", "a photo of a cat", "--schedulers", ",".join(SCHEDULERS), "--sag-scales", ",".join(SCALES),
               "--steps", "2", "--height", "64", "--width", "96", "--out", str(out), *extra])
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


def test_show_mask_tints_the_masked_positions(grids):
    (_, plain_out), (rc, masked_out) = grids
    assert rc == 0
    plain = np.asarray(Image.open(plain_out).convert("RGB")).astype(int)
    masked = np.asarray(Image.open(masked_out).convert("RGB")).astype(int)
    assert plain.shape == masked.shape
    changed = (masked != plain).any(axis=2)
    assert 0 < changed.mean() < 1
    # where the overlay changed a pixel, it moved it towards red
    assert (masked[changed, 0] - plain[changed, 0]).mean() > 0
    assert (masked[changed, 2] - plain[changed, 2]).mean() < 0


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
