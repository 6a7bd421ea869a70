"""A model folder's fingerprint (the export cache's identity of a model): it changes whenever any byte of any file
changes, and a file left untouched is not read again."""

import os
import shutil

import pytest

from sagrt.export import artifacts
from sagrt.export.models import folder_fingerprint, model_fingerprint

MIB = 1 << 20
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def make_folder(path, weights: bytes):
    """A model-like folder: a config and a weights file (only their bytes matter to the fingerprint)."""
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text('{"in_channels": 4}')
    (path / WEIGHTS).write_bytes(weights)
    age(path)
    return path


def age(folder, seconds=3600):
    """Moves every file's modification time an hour back, as for a model downloaded earlier."""
    for file in folder.rglob("*"):
        if file.is_file():
            then = file.stat().st_mtime_ns - seconds * 10**9
            os.utime(file, ns=(then, then))


def flip_middle_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    return bytes(changed)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def weights():
    return os.urandom(5 * MIB)  # more than the first and last MiB


@pytest.fixture
def hashed(monkeypatch):
    """Names of the files sha256'd from here on."""
    names, real = [], artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: names.append(path.name) or real(path))
    return names


def test_weights_that_differ_only_in_the_middle_give_another_fingerprint(tmp_path, cache, weights):
    original = make_folder(tmp_path / "original", weights)
    merged = make_folder(tmp_path / "merged", flip_middle_byte(weights))  # e.g. a LoRA merged into some layers
    same = make_folder(tmp_path / "same", weights)
    assert folder_fingerprint(original) != folder_fingerprint(merged)
    assert folder_fingerprint(same) == folder_fingerprint(original)  # the content, not the path, is the identity
    assert model_fingerprint(str(merged)) == folder_fingerprint(merged)
    assert folder_fingerprint(original).startswith("folder-")


def test_a_renamed_or_added_file_gives_another_fingerprint(tmp_path, cache, weights):
    folder = make_folder(tmp_path / "model", weights)
    before = folder_fingerprint(folder)
    os.rename(folder / WEIGHTS, folder / "unet" / "other.safetensors")
    renamed = folder_fingerprint(folder)
    (folder / "unet" / "extra.bin").write_bytes(b"x")
    assert len({before, renamed, folder_fingerprint(folder)}) == 3


def test_an_untouched_folder_is_not_read_again(tmp_path, cache, weights, hashed):
    folder = make_folder(tmp_path / "model", weights)
    first = folder_fingerprint(folder)
    assert sorted(hashed) == ["config.json", "diffusion_pytorch_model.safetensors"]
    hashed.clear()
    assert folder_fingerprint(folder) == first and hashed == []
    # the record lives in sagrt's cache: the user's model folder is left as it was
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["unet", "unet/config.json", WEIGHTS]
    assert artifacts.read_manifest(folder) is None and len(list((cache / "model-hashes").iterdir())) == 1


def test_a_write_in_place_is_seen(tmp_path, cache, weights, hashed):
    folder = make_folder(tmp_path / "model", weights)
    first = folder_fingerprint(folder)
    (folder / WEIGHTS).write_bytes(flip_middle_byte(weights))  # same size, same inode, new mtime
    hashed.clear()
    assert folder_fingerprint(folder) != first
    assert hashed == ["diffusion_pytorch_model.safetensors"]


def test_a_write_within_the_file_time_granularity_is_seen(tmp_path, cache, weights):
    """A file hashed right after it was written may be written again with the same size and the same timestamp
    (coarse file-system clocks): such a fresh hash is not trusted, the next fingerprint reads the file again."""
    folder = make_folder(tmp_path / "model", weights)
    (folder / WEIGHTS).write_bytes(weights)  # just written: modified now
    mtime = (folder / WEIGHTS).stat().st_mtime_ns
    first = folder_fingerprint(folder)
    (folder / WEIGHTS).write_bytes(flip_middle_byte(weights))
    os.utime(folder / WEIGHTS, ns=(mtime, mtime))  # the second write landed in the same clock tick
    assert folder_fingerprint(folder) != first


def test_an_unwritable_cache_still_fingerprints(tmp_path, monkeypatch, weights, hashed):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SAGRT_CACHE", str(blocker))  # the record cannot be written under a file
    folder = make_folder(tmp_path / "model", weights)
    assert folder_fingerprint(folder) == folder_fingerprint(folder)
    assert hashed.count("diffusion_pytorch_model.safetensors") == 2  # nothing remembered, so read each time


def test_a_copied_folder_keeps_its_fingerprint(tmp_path, cache, weights):
    folder = make_folder(tmp_path / "model", weights)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert folder_fingerprint(copy) == folder_fingerprint(folder)
