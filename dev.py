#!/usr/bin/env python3
"""The two commands of a fresh checkout; each makes (or updates) the environment it needs in .venv first.

    python3 dev.py run    # install sagrt, then generate one image with the built-in model (backend auto)
    python3 dev.py test   # install sagrt with its test extras (and Chromium for the page's tests), run pytest

Arguments after the command go to `sagrt generate` or to pytest, e.g. `python3 dev.py test -k onnxruntime`.
Only python3 is needed before; pip fetches the rest. Set SAGRT_TORCH to install another torch (default
torch==2.13.0, the CPU build on this project's machines; a CUDA build where a GPU is wanted).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
TORCH = os.environ.get("SAGRT_TORCH", "torch==2.13.0")
EXTRAS = {"run": "cpu", "test": "cpu,test,serve,ray,openvino"}
BROWSER = "chromium"  # Debian's package: the page's tests drive it headless


def say(message: str) -> None:
    print(f"dev.py: {message}", flush=True)


def pip(*args: str) -> None:
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", *args], check=True)


def ensure_env(extras: str) -> None:
    """.venv with torch and sagrt (editable, with `extras`); skipped when pyproject and extras are unchanged."""
    stamp = VENV / f".sagrt-{extras or 'base'}"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        say(f"creating {VENV}")
        venv.create(VENV, with_pip=True)
        pip("--upgrade", "pip")
    say(f"installing {TORCH} and sagrt{f'[{extras}]' if extras else ''} (once; a few minutes)")
    pip(TORCH)
    pip("-e", f"{ROOT}[{extras}]" if extras else str(ROOT))
    stamp.write_text(wanted)


def ensure_browser() -> None:
    """Debian's Chromium for the web page's tests, installed with apt-get where this user may."""
    if shutil.which(BROWSER):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        say(f"{BROWSER} is not installed and apt-get cannot run here: the page's browser tests will skip "
            f"(install it with: sudo apt-get install {BROWSER})")
        return
    say(f"installing {BROWSER} with apt-get (once)")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", BROWSER], check=True, env={**os.environ,
                   "DEBIAN_FRONTEND": "noninteractive"})


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_env(EXTRAS[command])
    # as `source .venv/bin/activate` would: the venv's python and sagrt come first on PATH
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIRTUAL_ENV": str(VENV),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if command == "run":
        args = rest or ["a red circle on a blue background"]
        return subprocess.run([str(BIN / "sagrt"), "generate", *args], env=env).returncode
    ensure_browser()
    return subprocess.run([str(BIN / "python"), "-m", "pytest", "-q", *rest], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
