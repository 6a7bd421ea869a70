"""Where exports and engines are kept and when they are reused, and the TensorRT engines against torch.

CPU: the export cache (a folder per precision, opset and SAG layer) with real exports, and `build_engines` up to
the GPU boundary: only the TensorRT calls (`require_tensorrt`, `this_platform`, `build_engine`) are replaced by a
stand-in that writes an engine file; the plan, the cache key, the default folder, reuse, --force and the
manifest-last rule are sagrt's own code on the real tiny export.
GPU (marked, skipped without CUDA and TensorRT): text encoder and VAE engines against torch fp32, CUDA-graph
replays fed new inputs, and foreign timing caches.
"""

from __future__ import annotations

import copy
import hashlib
from types import SimpleNamespace

import pytest
import torch

from conftest import relative_error
from sagrt.engine import tensorrt_build
from sagrt.engine.profiles import BuildConfig, Range
from sagrt.engine.tensorrt_build import BuildPlan, build_engines
from sagrt.engine.tensorrt_runner import EngineError, read_engine_manifest
from sagrt.export import artifacts
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.export.onnx_export import export_folder, export_key, export_model

PLATFORM = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "10.8.0.43"}
FP32 = BuildConfig(precision="fp32")
CALL_BOUND = 1e-4  # docs/design.md: an engine call against torch, fp32


# ---- the export cache ----------------------------------------------------------------------------------------
def self_attention_layers(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(".attn1")]


def test_export_keys_differ_per_precision_opset_and_layer(tiny):
    layers = self_attention_layers(tiny.unet)
    assert MID_BLOCK_LAYER in layers and len(layers) >= 3
    keys = {export_key(precision, opset, layer) for precision in ("fp32", "fp16") for opset in (17, 18)
            for layer in layers}
    assert len(keys) == 2 * 2 * len(layers)
    folders = {export_folder("preset-x", None, precision, 17, MID_BLOCK_LAYER) for precision in ("fp32", "fp16")}
    assert len(folders) == 2 and all(folder.parent.name == "onnx" for folder in folders)


def test_an_export_of_another_opset_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGRT_CACHE", str(tmp_path))
    first = export_model("tiny", opset=17, progress=False)
    inode = (first / "unet.onnx").stat().st_ino
    second = export_model("tiny", opset=18, progress=False)
    assert first != second and first.parent == second.parent
    assert artifacts.read_manifest(first)["opset"] == 17 and artifacts.read_manifest(second)["opset"] == 18
    assert export_model("tiny", opset=17, progress=False) == first  # reused, not redone
    assert (first / "unet.onnx").stat().st_ino == inode


# ---- build_engines up to the GPU boundary ----------------------------------------------------------------------
class StandIn:
    """Replaces the TensorRT calls of build_engines; `fail_on` names a network whose build raises."""

    def __init__(self):
        self.built, self.fail_on = [], None

    def build_engine(self, trt, logger, onnx_path, engine_path, profiles, config, timing_cache, progress,
                     own_timing_cache=True):
        network = onnx_path.stem
        if network == self.fail_on:
            raise tensorrt_build.BuildError(f"TensorRT could not build the {network} engine")
        assert onnx_path.is_file() and profiles and config.precision == "fp32"
        plan = f"{network} engine for {sorted(profiles[0])}".encode()
        artifacts.write_bytes_atomic(engine_path, plan)
        self.built.append(network)
        return hashlib.sha256(plan).hexdigest()


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGRT_CACHE", str(tmp_path / "cache"))
    fake = StandIn()
    trt = SimpleNamespace(Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}))
    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda what: trt)
    monkeypatch.setattr(tensorrt_build, "this_platform", lambda trt, device=None: dict(PLATFORM))
    monkeypatch.setattr(tensorrt_build, "build_engine", fake.build_engine)
    return fake


NETWORKS = ["text_encoder", "unet", "vae_decoder"]


def test_engines_go_to_a_default_folder_per_cache_key(tiny, tiny_onnx, stand_in, tmp_path):
    folder = build_engines(tiny_onnx, FP32, progress=False)
    plan = BuildPlan.make(tiny_onnx, FP32, PLATFORM)
    assert folder == tmp_path / "cache" / tiny.fingerprint / "tensorrt" / plan.key
    assert sorted(stand_in.built) == NETWORKS
    manifest = read_engine_manifest(folder)
    assert manifest["cache_key"] == plan.key and sorted(manifest["engines"]) == NETWORKS
    assert (folder / "tokenizer").is_dir() and (folder / "scheduler" / "scheduler_config.json").is_file()
    other = build_engines(tiny_onnx, BuildConfig(precision="fp32", batch=Range(1, 2, 2)), progress=False)
    assert other != folder and other.parent == folder.parent and len(stand_in.built) == 6
    assert read_engine_manifest(folder)["cache_key"] == plan.key  # the first build is left as it was


def test_a_matching_build_is_reused_and_force_rebuilds(tiny_onnx, stand_in, tmp_path, capsys):
    folder = build_engines(tiny_onnx, FP32, tmp_path / "engines", progress=False)
    created = (folder / "unet.trt10.8.0.43.plan").stat().st_ino
    assert build_engines(tiny_onnx, FP32, folder) == folder
    assert "TensorRT engines up to date in" in capsys.readouterr().out
    assert len(stand_in.built) == 3 and (folder / "unet.trt10.8.0.43.plan").stat().st_ino == created
    build_engines(tiny_onnx, FP32, folder, force=True, progress=False)
    assert len(stand_in.built) == 6 and (folder / "unet.trt10.8.0.43.plan").stat().st_ino != created
    # a truncated engine file makes the build unfinished: the next call builds again
    engine = folder / "vae_decoder.trt10.8.0.43.plan"
    engine.write_bytes(engine.read_bytes()[:5])
    build_engines(tiny_onnx, FP32, folder, progress=False)
    assert len(stand_in.built) == 9


def test_the_manifest_is_written_last(tiny_onnx, stand_in, tmp_path):
    folder = build_engines(tiny_onnx, FP32, tmp_path / "engines", progress=False)
    stand_in.fail_on = "unet"
    with pytest.raises(tensorrt_build.BuildError, match="could not build the unet engine"):
        build_engines(tiny_onnx, FP32, folder, force=True, progress=False)
    # the old manifest no longer vouches for a folder whose engines are being replaced
    assert artifacts.read_manifest(folder) is None
    assert not BuildPlan.make(tiny_onnx, FP32, PLATFORM).is_built(folder)
    with pytest.raises(EngineError, match="no finished TensorRT build in .*: build one with: sagrt build"):
        read_engine_manifest(folder)
    stand_in.fail_on = None
    build_engines(tiny_onnx, FP32, folder, progress=False)
    assert read_engine_manifest(folder)["cache_key"] == BuildPlan.make(tiny_onnx, FP32, PLATFORM).key


# ---- GPU: real engines -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines_fp32(tmp_path_factory):
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'sagrt[tensorrt]')")
    from sagrt.engine.tensorrt_build import build_for_model

    config = BuildConfig(precision="fp32", batch=Range(1, 1, 2), height=Range(48, 64, 80), width=Range(48, 64, 80))
    return build_for_model("tiny", config, tmp_path_factory.mktemp("engines"), progress=False)


@pytest.fixture(scope="module")
def torch_cuda(tiny):
    """The torch reference on the GPU, on a copy: moving the session's tiny modules would move them for every
    CPU test after this one."""
    from sagrt.runtime.torch_runners import TorchRunners

    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full fp32 convolutions, as the fp32 engines run them
    yield TorchRunners(copy.deepcopy(tiny), device="cuda")
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
@torch.no_grad()
def test_tensorrt_text_encoder_matches_torch_fp32(engines_fp32, torch_cuda):
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    generator = torch.Generator(device="cuda").manual_seed(1)
    with TensorRTRunners(engines_fp32) as runners:
        for batch in (1, 2):
            input_ids = torch.randint(0, 591, (batch, 77), device="cuda", generator=generator)
            for clip_skip in (None, 0, 1):
                hidden = runners.encode_text(input_ids, clip_skip)
                assert hidden.shape == (batch, 77, 32) and hidden.dtype == torch.float32
                assert relative_error(hidden.cpu(), torch_cuda.encode_text(input_ids, clip_skip).cpu()) <= CALL_BOUND


@pytest.mark.gpu
@torch.no_grad()
def test_tensorrt_vae_decoder_matches_torch_fp32(engines_fp32, torch_cuda):
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    generator = torch.Generator(device="cuda").manual_seed(2)
    with TensorRTRunners(engines_fp32) as runners:
        for batch, (h, w) in ((1, (8, 8)), (2, (6, 10)), (1, (10, 7))):
            latents = torch.randn(batch, 4, h, w, device="cuda", generator=generator)
            image = runners.decode(latents)
            assert image.shape == (batch, 3, 8 * h, 8 * w)
            assert relative_error(image.cpu(), torch_cuda.decode(latents).cpu()) <= CALL_BOUND


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replays_take_new_inputs_on_both_unet_batches(tmp_path):
    """A static build captures one graph per input shape (UNet: 2B and B). Each replay gets new inputs and must
    give what plain execution gives for them: a replay that ran nothing, or read the captured inputs, fails."""
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'sagrt[tensorrt]')")
    from sagrt.engine.tensorrt_build import build_for_model
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    config = BuildConfig(precision="fp32", batch=Range(1, 1, 1), height=Range(64, 64, 64), width=Range(64, 64, 64),
                         static=True)
    engines = build_for_model("tiny", config, tmp_path / "static", progress=False)
    generator = torch.Generator(device="cuda").manual_seed(3)
    previous = {}
    with TensorRTRunners(engines, cuda_graph=False) as plain, TensorRTRunners(engines) as graphed:
        for round_ in range(4):  # the first call of a shape runs and captures; the next three replay
            for batch in (2, 1):
                sample = torch.randn(batch, 4, 8, 8, device="cuda", generator=generator)
                context = torch.randn(batch, 77, 32, device="cuda", generator=generator)
                t = torch.tensor(100.0 + 250 * round_, device="cuda")
                got, expected = graphed.unet(sample, t, context), plain.unet(sample, t, context)
                for a, b in zip(got, expected):
                    torch.testing.assert_close(a, b)
                if batch in previous:
                    assert relative_error(got[0].cpu(), previous[batch].cpu()) > 1e-2  # new inputs, new output
                previous[batch] = got[0]
            latents = torch.randn(1, 4, 8, 8, device="cuda", generator=generator)
            torch.testing.assert_close(graphed.decode(latents), plain.decode(latents))
        bindings = graphed.engines["unet"].bindings
        assert len(bindings) == 2 and all(b.graph is not None for b in bindings.values())
        assert all(b.graph is None for b in plain.engines["unet"].bindings.values())


@pytest.mark.gpu
def test_a_foreign_timing_cache_is_started_afresh_in_the_engine_folder_and_refused_when_named(tmp_path):
    """A timing cache TensorRT cannot read (another GPU or version, or damaged): sagrt's own in the engine folder
    is replaced by this build's; one the user named is refused and left as it was (the CPU test in
    test_tensorrt.py checks the same rule on a stand-in builder config)."""
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'sagrt[tensorrt]')")
    from sagrt.engine.tensorrt_build import build_for_model

    garbage = b"not a timing cache" * 64
    static = dict(precision="fp32", batch=Range(1, 1, 1), height=Range(64, 64, 64), width=Range(64, 64, 64),
                  static=True)
    own = tmp_path / "engines" / "timing.cache"
    own.parent.mkdir()
    own.write_bytes(garbage)
    engines = build_for_model("tiny", BuildConfig(**static), own.parent, progress=False)
    assert read_engine_manifest(engines)["cache_key"] and own.stat().st_size > 0 and own.read_bytes() != garbage
    named = tmp_path / "mine.cache"
    named.write_bytes(garbage)
    with pytest.raises(tensorrt_build.BuildError, match="will not overwrite it"):
        build_for_model("tiny", BuildConfig(**static, timing_cache=str(named)), tmp_path / "other", progress=False)
    assert named.read_bytes() == garbage
