"""sagrt: Stable Diffusion with Self-Attention Guidance on compiled engines."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("sagrt")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

# In a source checkout the subpackages are the sibling folders export/, engine/ and runtime/ (pyproject's
# package-dir maps them on install). A process started at the checkout's root imports this folder first,
# so let `import sagrt.runtime` find them there too; an installed copy has no such siblings.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "runtime" / "__init__.py").is_file():
    __path__.append(str(_checkout))
