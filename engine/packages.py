"""Which runtime packages are installed, read from their distribution metadata (nothing is imported).

Two facts the GPU path depends on and pip does not check:
- `onnxruntime` and `onnxruntime-gpu` (and the other ONNX Runtime builds) install the same `onnxruntime`
  module over each other; with two of them installed, the files of the last one win and ONNX Runtime loses
  its CUDA and TensorRT providers. A GPU install must hold exactly one.
- TensorRT wheels are built for one CUDA major (`tensorrt-cu12`, `tensorrt-cu13`); its kernels must run next
  to a torch built for the same major, which allocates the memory and streams the engines use.
"""

from __future__ import annotations

import re
from importlib import metadata

TENSORRT_REQUIREMENT = "tensorrt-cu{major}>=10.1,<11"


def module_distributions(module: str) -> list[str]:
    """Names of the installed distributions that provide top-level `module`, sorted (normalised: lower case, '-')."""
    names = metadata.packages_distributions().get(module, [])
    return sorted({re.sub(r"[-_.]+", "-", name).lower() for name in names})


def onnxruntime_conflict(distributions: list[str] | None = None) -> str | None:
    """One line when more than one ONNX Runtime build is installed (they overwrite each other's `onnxruntime`
    module), else None."""
    found = module_distributions("onnxruntime") if distributions is None else distributions
    if len(found) < 2:
        return None
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else found[0]
    return (f"{' and '.join(found)} are installed together: they share one onnxruntime module and its CUDA and "
            f"TensorRT providers go missing; keep one: pip uninstall -y {' '.join(found)} && pip install {keep}")


def tensorrt_cuda_major(distributions: list[str] | None = None) -> int | None:
    """CUDA major the installed TensorRT wheel is built for (from its name, e.g. tensorrt-cu12-bindings), or None
    when it does not say (a TensorRT from a tar file or a system package)."""
    found = module_distributions("tensorrt") if distributions is None else distributions
    majors = {int(match.group(1)) for name in found for match in [re.search(r"-cu(\d+)(?:-|$)", name)] if match}
    return majors.pop() if len(majors) == 1 else None


def cuda_major_mismatch(tensorrt_major: int | None, torch_cuda: str | None) -> str | None:
    """Why TensorRT cannot run beside this torch (different CUDA majors), or None when they agree or one is
    unknown."""
    if tensorrt_major is None or not torch_cuda:
        return None
    torch_major = int(torch_cuda.split(".")[0])
    if torch_major == tensorrt_major:
        return None
    return (f"TensorRT is built for CUDA {tensorrt_major} while torch is built for CUDA {torch_cuda} (install the "
            f"TensorRT of torch's CUDA: pip uninstall -y tensorrt-cu{tensorrt_major} && pip install "
            f"'{TENSORRT_REQUIREMENT.format(major=torch_major)}')")


def onnxruntime_missing() -> str | None:
    """Why the onnxruntime backend cannot load here (no ONNX Runtime installed), or None."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is not None:
        return None
    return ("ONNX Runtime is not installed: pip install 'sagrt[cpu]' (CPU) or 'sagrt[gpu]' (NVIDIA GPU), "
            "one of the two")
