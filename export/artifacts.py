"""Files on disk: atomic writes, content hashes and manifests, shared by the export and engine stages.

Every artifact is written to a temporary name in its final folder and renamed when complete,
so a crash never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

MANIFEST = "manifest.json"
HASH_RECORD = ".sha256-record.json"  # see recorded_sha256s
RACY_NS = 2_000_000_000  # coarsest common file-time granularity (FAT), see recorded_sha256s


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds,
    removes it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        set_usual_mode(tmp)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def set_usual_mode(path: str | Path) -> None:
    """Gives a finished artifact the mode a new file gets under the process umask (0644 usually)."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256s(folder: str | Path, names, record_path: str | Path | None = None) -> dict[str, str]:
    """sha256 of each folder/name, remembered in `record_path` (default folder/HASH_RECORD) under the file's size,
    modification time and inode (as git's index does), so a file left untouched since it was last hashed is not
    read again: loading an SD 1.5 export no longer reads its 3.4 GB of weights. Any write, copy or replacement
    changes the stat and the file is hashed again, except a write that keeps the size and lands within the
    file system's timestamp granularity of the last one: so a hash taken less than RACY_NS after the file's
    modification is not trusted later (git's "racily clean" rule), the next call hashes once more. Best effort:
    where sagrt cannot write the record, every load hashes."""
    folder = Path(folder)
    record_path = Path(record_path) if record_path is not None else folder / HASH_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    digests, changed = {}, False
    for name in names:
        stat_time, info = time.time_ns(), (folder / name).stat()
        key = [info.st_size, info.st_mtime_ns, info.st_ino]
        entry = record.get(name)
        if not (isinstance(entry, list) and len(entry) == 5 and entry[:3] == key
                and entry[4] - info.st_mtime_ns >= RACY_NS):
            record[name] = entry = key + [sha256_file(folder / name), stat_time]
            changed = True
        digests[name] = entry[3]
    if changed:
        with contextlib.suppress(OSError):
            write_bytes_atomic(record_path, json.dumps(record, indent=1).encode())
    return digests


def write_json_atomic(path: str | Path, data, **dumps_options) -> None:
    """`data` as indented JSON (one trailing newline), written atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, **dumps_options) + "\n").encode())


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    write_json_atomic(path, manifest, sort_keys=True)
    return path


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, or None when there is none (or it is unreadable)."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def manifest_differences(found: dict, wanted: dict) -> list[str]:
    """'key: found X, wanted Y' for every key of `wanted` whose value differs in `found`."""
    return [f"{key}: found {found.get(key)!r}, wanted {value!r}" for key, value in wanted.items()
            if found.get(key) != value]


def cache_root() -> Path:
    """Root of sagrt's artifact cache: $SAGRT_CACHE, else ~/.cache/sagrt."""
    return Path(os.environ.get("SAGRT_CACHE") or Path.home() / ".cache" / "sagrt")


def artifact_dir(fingerprint: str, stage: str, key: str) -> Path:
    """The one place artifact paths come from: <cache>/<model fingerprint>/<stage>/<key>,
    e.g. stage "onnx" or "tensorrt", key "fp32-opset17-mid_block"."""
    return cache_root() / fingerprint / stage / key
