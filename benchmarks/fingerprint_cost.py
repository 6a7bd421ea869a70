"""What a model folder's fingerprint costs: the first time (every byte hashed) and later (sizes, times, inodes).

    python benchmarks/fingerprint_cost.py --gib 4 --dir /tmp

Writes a model-like folder with one weights file of `--gib` GiB, drops that file from the page cache
(posix_fadvise, where the OS has it) and times `folder_fingerprint`: cold, then again with the hashes remembered,
then after a write to the middle of the file. Removes the folder at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


CHUNK = 64 << 20


def write_weights(path: Path, gib: float) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as fh:
        for _ in range(int(gib * (1 << 30)) // CHUNK):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())


def drop_from_page_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--dir", default=None, help="where to write the folder (default: the system's temp)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="sagrt-fingerprint-"))
    os.environ["SAGRT_CACHE"] = str(root / "cache")
    from sagrt.export.models import folder_fingerprint

    try:
        model = root / "model"
        (model / "unet").mkdir(parents=True)
        (model / "unet" / "config.json").write_text("{}")
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        write_weights(weights, args.gib)
        old = time.time_ns() - 3600 * 10**9  # as for a model downloaded earlier
        os.utime(weights, ns=(old, old))
        cold = drop_from_page_cache(weights)
        first, fingerprint = timed(lambda: folder_fingerprint(model))
        again, same = timed(lambda: folder_fingerprint(model))
        with open(weights, "r+b") as fh:
            fh.seek(weights.stat().st_size // 2)
            fh.write(b"\xff")
        changed_time, changed = timed(lambda: folder_fingerprint(model))
        assert same == fingerprint != changed
        size = weights.stat().st_size / (1 << 30)
        print(f"weights {size:.2f} GiB ({'cold' if cold else 'possibly cached'} read): first fingerprint "
              f"{first:.2f} s ({size / first:.2f} GiB/s), remembered {again * 1e3:.2f} ms, after a write to the "
              f"middle {changed_time:.2f} s (fingerprint changed)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
