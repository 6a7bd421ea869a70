"""sagrt: Stable Diffusion with Self-Attention Guidance on compiled engines.

This folder is the core every layer imports downward from: errors, the names of networks and precisions,
and the runner interface. The layers are sibling folders installed as subpackages (pyproject's package-dir):
sagrt.export (export/), sagrt.engine (engine/), sagrt.runtime (runtime/), sagrt.bench (bench/).
"""

from importlib.metadata import version

__version__ = version("sagrt")
