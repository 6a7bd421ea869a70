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


class CliProcess:
    """`python -m sagrt.runtime.cli ARGS` in a real subprocess, its stderr collected as it comes, so that a test can
    wait for a stage of the run and then act on the process (signal it, kill a child of it)."""

    def __init__(self, *args, cwd=None):
        import subprocess
        import sys
        import threading

        # SIGINT back to Python's handler first: a shell's background job (`nohup pytest &`) starts with it
        # ignored, and the Ctrl-C tests would then find nothing to interrupt
        start = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "runpy.run_module('sagrt.runtime.cli', run_name='__main__')")
        self.process = subprocess.Popen([sys.executable, "-c", start, *args], cwd=cwd, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = []
        self.reader = threading.Thread(target=lambda: self.err.extend(iter(lambda: self.process.stderr.read(1), "")),
                                       daemon=True)
        self.reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.process.poll() is None, f"ended before {text!r}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.stderr}"
            time.sleep(0.05)

    def finish(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def children(self) -> list[int]:
        """Process ids of the direct children (Linux /proc)."""
        from pathlib import Path

        pid = self.process.pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
