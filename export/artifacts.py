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

from sagrt.errors import SagrtError

MANIFEST = "manifest.json"
HASH_RECORD = ".sha256-record.json"  # see recorded_sha256s
RACY_NS = 2_000_000_000  # coarsest common file-time granularity (FAT), see recorded_sha256s


class ArtifactError(SagrtError):
    """A file name in a manifest that points outside its folder, or a manifest entry sagrt cannot read."""


def member(folder: str | Path, name) -> Path:
    """folder/name for a name a manifest gives, refused unless it is a plain relative path ('a/b.onnx') that stays
    inside `folder` once symlinks are followed: a manifest must never make sagrt read or remove a file elsewhere."""
    folder = Path(folder)
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in name or "\0" in name:
        raise ArtifactError(f"manifest in {folder} names {name!r}, not a plain relative file name: the folder is "
                            "damaged or not sagrt's; export or build it again")
    path = folder.joinpath(*parts)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ArtifactError(f"{name} in {folder} leads outside the folder (a symlink or an absolute path): the "
                            "folder is damaged or not sagrt's; export or build it again")
    return path


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


def boot_id() -> str | None:
    """An id of this boot of the machine (Linux: the kernel's boot_id), or None where none can be read."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(AttributeError, OSError):
        return f"boot-{round(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME), -1):.0f}"
    return None


def _read_record(record_path: Path) -> dict:
    """A hash record as {"files": {name: [size, mtime_ns, inode, sha256, hashed_ns]}, "verified_boot": id or None}."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return {"files": {}, "verified_boot": None}
    if not isinstance(record, dict):
        return {"files": {}, "verified_boot": None}
    if isinstance(record.get("files"), dict):
        return {"files": record["files"], "verified_boot": record.get("verified_boot")}
    return {"files": record, "verified_boot": None}  # the flat record of sagrt 0.2


def full_verification_due(folder: str | Path) -> bool:
    """True until every file of `folder` has been hashed in full once during this boot of the machine (the stat
    record below cannot see bytes changed in place with the file's mtime restored)."""
    current = boot_id()
    return current is None or _read_record(Path(folder) / HASH_RECORD)["verified_boot"] != current


def recorded_sha256s(folder: str | Path, names, full: bool = False, record_path: str | Path | None = None,
                     confined: bool = True) -> dict[str, str]:
    """sha256 of each folder/name, remembered in `record_path` (default folder/HASH_RECORD) under the file's size,
    modification time and inode (as git's index does), so a file left untouched since it was last hashed is not
    read again: loading an SD 1.5 export does not read its weights again. Any write, copy or replacement
    changes the stat and the file is hashed again, except a write that keeps the size and lands within the
    file system's timestamp granularity of the last one: so a hash taken less than RACY_NS after the file's
    modification is not trusted later (git's "racily clean" rule), the next call hashes once more.
    `full`: hash every file whatever the record says, and remember that the folder was verified in full during
    this boot. `confined`: names must stay inside `folder` (artifact folders; a user's model folder may link
    out, e.g. into a Hugging Face cache). Best effort: where sagrt cannot write the record, every load hashes."""
    folder = Path(folder)
    record_path = Path(record_path) if record_path is not None else folder / HASH_RECORD
    record = _read_record(record_path)
    files = record["files"]
    digests, changed = {}, full
    for name in names:
        path = member(folder, name) if confined else folder / name
        stat_time, info = time.time_ns(), path.stat()
        key = [info.st_size, info.st_mtime_ns, info.st_ino]
        entry = files.get(name)
        if full or not (isinstance(entry, list) and len(entry) == 5 and entry[:3] == key
                        and entry[4] - info.st_mtime_ns >= RACY_NS):
            files[name] = entry = key + [sha256_file(path), stat_time]
            changed = True
        digests[name] = entry[3]
    if full:
        record["verified_boot"] = boot_id()
    if changed:
        with contextlib.suppress(OSError):
            write_bytes_atomic(record_path, json.dumps(record, indent=1).encode())
    return digests


def check_files(folder: str | Path, files: dict, redo: str, full: bool | None = None) -> bool:
    """Checks that every file of a manifest's {name: {"sha256", "bytes"}} table is inside `folder`, present, of its
    size and sha256; raises ArtifactError naming the first that is not, with `redo` (the command that remakes the
    folder). `full`: hash every file (None: when full_verification_due). Returns whether it hashed in full."""
    folder = Path(folder)
    if not isinstance(files, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                                              and isinstance(entry.get("bytes"), int) for entry in files.values()):
        raise ArtifactError(f"the file table of the manifest in {folder} is malformed: {redo}")
    for name, entry in sorted(files.items()):
        path = member(folder, name)
        if not path.is_file():
            raise ArtifactError(f"{name} is missing from {folder}: {redo}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{name} in {folder} is truncated or altered ({size} bytes, manifest says "
                                f"{entry['bytes']}): {redo}")
    full = full_verification_due(folder) if full is None else full
    digests = recorded_sha256s(folder, sorted(files), full=full)
    for name, entry in sorted(files.items()):
        if digests[name] != entry["sha256"]:
            raise ArtifactError(f"{name} in {folder} is corrupted (sha256 differs from the manifest): {redo}")
    return full


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


# ---- folders sagrt writes into -------------------------------------------------------------------
CLAIM = ".sagrt-claim.json"  # the files sagrt owns in a folder while a manifest is being replaced
STAGING_LOCK = ".lock"
LEGACY_STAGING_AGE_S = 3600  # a staging folder without a lock (sagrt <= 0.2.1) older than this is abandoned


@contextlib.contextmanager
def staging_dir(folder: str | Path, prefix: str):
    """A new folder `folder/<prefix>XXXX` for work in progress, removed after the block. While the block runs this
    process holds an advisory lock on a file inside it; the kernel drops the lock when the process dies (also by
    kill -9), which is how `remove_stale_staging` tells an abandoned staging folder from a live one."""
    import fcntl

    staging = lock = None
    try:
        with interrupts_deferred():  # an interrupt between mkdtemp and the assignment would leave the folder
            staging = Path(tempfile.mkdtemp(dir=folder, prefix=prefix))
            lock = os.open(staging / STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield staging
    finally:
        if lock is not None:
            os.close(lock)
        if staging is not None:
            _remove_tree(staging)


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM received inside the block are acted on when it has ended, so that a step and the
    bookkeeping that undoes it are not torn apart. Python runs signal handlers in the main thread whichever
    thread the OS delivered the signal to, so the handlers are swapped for a recorder (blocking the signal in
    the main thread alone would not hold it back); outside the main thread there is nothing to defer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # e.g. KeyboardInterrupt
            elif handler != signal.SIG_IGN:
                signal.raise_signal(received[0])  # the default action


def remove_stale_staging(folder: str | Path, prefix: str, legacy: bool = True) -> list[Path]:
    """Removes the `prefix*` staging folders of `folder` that no live process holds (see staging_dir); returns
    them. `legacy`: also one from before the lock existed, once it is LEGACY_STAGING_AGE_S old (only in a folder
    known to be sagrt's: without a lock file, nothing proves such a folder is sagrt's)."""
    import fcntl

    removed = []
    for staging in sorted(Path(folder).glob(f"{prefix}*")):
        if staging.is_symlink() or not staging.is_dir():
            continue
        lock_path = staging / STAGING_LOCK
        if not lock_path.exists():
            if not legacy or time.time() - staging.stat().st_mtime < LEGACY_STAGING_AGE_S:
                continue  # perhaps a writer between mkdtemp and its lock, or an older sagrt still at work
            _remove_tree(staging)
            removed.append(staging)
            continue
        try:
            lock = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            _remove_tree(staging)
            removed.append(staging)
        finally:
            os.close(lock)
    return removed


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def owned_files(folder: str | Path, kind: str) -> set[str] | None:
    """The names of the files sagrt wrote in `folder`: those its `kind` manifest lists, plus those of a claim left
    by a replacement that did not finish. None when the folder holds neither (it is not sagrt's to change)."""
    folder = Path(folder)
    owned = None
    manifest = read_manifest(folder)
    if manifest is not None and isinstance(manifest, dict) and manifest.get("kind") == kind \
            and isinstance(manifest.get("files"), dict):
        owned = set(manifest["files"])
    try:
        claim = json.loads((folder / CLAIM).read_text())
    except (OSError, ValueError):
        claim = None
    if isinstance(claim, dict) and claim.get("kind") == kind and isinstance(claim.get("files"), list):
        owned = (owned or set()) | {name for name in claim["files"] if isinstance(name, str)}
    return owned


def foreign_entries(folder: str | Path, staging_prefix: str) -> list[str]:
    """Entries of `folder` that sagrt did not put there, for a folder with no manifest or claim: anything but its
    hash record, claim and staging folders."""
    own = {HASH_RECORD, CLAIM}
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name not in own and not p.name.startswith(staging_prefix))


def write_claim(folder: str | Path, kind: str, names) -> None:
    write_json_atomic(Path(folder) / CLAIM, {"kind": kind, "files": sorted(names)})


def remove_owned(folder: str | Path, names) -> None:
    """Removes the files `names` (manifest names, checked to stay inside `folder`) and then any folder they leave
    empty below `folder`; other files are never touched."""
    folder = Path(folder)
    parents = set()
    for name in names:
        path = member(folder, name)
        if path.is_file() or path.is_symlink():
            path.unlink()
        parents.update(p for p in path.parents if p != folder and p.is_relative_to(folder))
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty
