import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one torch thread: OpenMP barriers spin badly when another process takes a core, and tiny models gain nothing
torch.set_num_threads(1)


def relative_error(a, b) -> float:
    """||a - b|| / ||b||, refusing a reference of zeros (it would prove nothing)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    norm = b.norm().item()
    assert norm > 0, "reference is all zeros"
    return (a - b).norm().item() / norm


@pytest.fixture(scope="session")
def tiny():
    from sagrt.export.models import build_preset

    return build_preset("tiny")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none on this machine)"))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny):
    """The tiny model exported to ONNX once per session (fp32, opset 17, default SAG layer)."""
    from sagrt.export.onnx_export import export_model

    return export_model(tiny, tmp_path_factory.mktemp("tiny-onnx"), progress=False)
