"""sagrt verify DIR: reads every file of an export or engine folder and checks it against the folder's manifest.

Loading trusts a file's size, mtime and inode once it has been hashed in full in this boot of the machine;
`verify` always reads every byte, so it catches bytes changed in place with the mtime restored.
"""

from __future__ import annotations

from pathlib import Path

from sagrt.errors import SagrtError
from sagrt.export import artifacts


def add_arguments(parser):
    parser.add_argument("folder", metavar="DIR", help="a folder made by `sagrt export` or `sagrt build`")


def verify_folder(folder: str | Path) -> tuple[str, dict]:
    """(kind, file table) of `folder` after reading every file it lists; raises SagrtError at the first that
    differs from the manifest."""
    from sagrt.export.onnx_export import verify_export

    folder = Path(folder)
    if not folder.is_dir():
        raise SagrtError(f"{folder} is not a folder: name a folder made by `sagrt export` or `sagrt build`")
    manifest = artifacts.read_manifest(folder)
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind == "onnx":
        return kind, verify_export(folder, full=True)["files"]
    if kind == "tensorrt":
        from sagrt.engine.tensorrt_runner import engine_table

        files = engine_table(manifest)
        artifacts.check_files(folder, files, "rebuild the engines with `sagrt build ... --force`", full=True)
        return kind, files
    raise SagrtError(f"{folder} holds no sagrt manifest ({artifacts.MANIFEST} of an export or an engine build)")


def run(args) -> int:
    kind, files = verify_folder(args.folder)
    size = sum(entry["bytes"] for entry in files.values())
    what = "ONNX export" if kind == "onnx" else "TensorRT engines"
    print(f"{args.folder}: {what}, {len(files)} file(s), {size / 1e6:.1f} MB read: every sha256 matches the manifest")
    return 0
