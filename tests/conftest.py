import os
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# exports made on first use (backend auto / onnxruntime) go to a folder of this test session, not ~/.cache
os.environ["SAGRT_CACHE"] = tempfile.mkdtemp(prefix="sagrt-test-cache-")
# one torch thread: OpenMP barriers spin badly when another process takes a core, and tiny models gain nothing
torch.set_num_threads(1)


def relative_error(a, b) -> float:
    """||a - b|| / ||b||, refusing a reference of zeros (it would prove nothing)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    norm = b.norm().item()
    assert norm > 0, "reference is all zeros"
    return (a - b).norm().item() / norm


def diffusers_pipeline(cls, tiny, scheduler):
    """A diffusers pipeline class (StableDiffusionSAGPipeline, StableDiffusionPipeline) over the tiny modules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@pytest.fixture(scope="session", autouse=True)
def tiny_in_the_cache():
    """The session cache holds tiny's export before any test runs, as a second `sagrt generate` finds it: tests of
    the CLI's output (one line on stderr) then see no export progress bars from backend auto's first use."""
    from sagrt.export.onnx_export import export_model

    return export_model("tiny", progress=False)
