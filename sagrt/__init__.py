"""sagrt: Stable Diffusion with Self-Attention Guidance on compiled engines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sagrt")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
