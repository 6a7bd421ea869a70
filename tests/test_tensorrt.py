"""TensorRT path up to the GPU boundary (CPU), and the GPU tests that need CUDA + TensorRT (skipped without).

The CPU tests use an export manifest made from export/specs.py for the tiny model, as the export writes it.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import relative_error
from sagrt.engine.profiles import (BuildConfig, BuildConfigError, ProfileError, Range, build_profiles, cache_key,
                                   check_shapes, engine_filename)
from sagrt.engine.tensorrt_build import (BuildError, BuildPlan, BuildProgress, check_output_dtypes, rebuild_command,
                                         tensorrt_missing)
from sagrt.engine.tensorrt_runner import (Engine, EngineError, EngineStateError, TRT_TO_TORCH, check_platform,
                                          read_engine_manifest, shape_rebuild_command, torch_dtype)
from sagrt.export.artifacts import write_manifest
from sagrt.export.attention import MID_BLOCK_LAYER
from sagrt.export.specs import text_encoder_spec, unet_spec, vae_decoder_spec
from sagrt.runtime.runners import ModelInfo

PLATFORM = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "10.8.0.43"}
TRT_USABLE = not tensorrt_missing()
needs_no_tensorrt = pytest.mark.skipif(TRT_USABLE, reason="TensorRT and a GPU are usable here")


@pytest.fixture(scope="module")
def info(tiny):
    return ModelInfo.of(tiny)


def export_manifest(info: ModelInfo, precision: str = "fp16") -> dict:
    """The manifest an ONNX export of the tiny model writes (networks from export/specs.py)."""
    dtype = {"fp16": "float16", "fp32": "float32"}[precision]
    specs = (unet_spec(info.text_hidden_size, dtype), text_encoder_spec(info.text_hidden_size, dtype),
             vae_decoder_spec(dtype))
    listed = lambda tensors: [[t.name, t.dtype, list(t.shape)] for t in tensors]  # noqa: E731
    return {
        "kind": "onnx", "sagrt_version": "0.1.0", "model_fingerprint": info.fingerprint, "model_source": "tiny",
        "opset": 17, "precision": precision, "sag_layer": MID_BLOCK_LAYER, "model_info": info.to_dict(),
        "files": {s.filename: {"sha256": hashlib.sha256(s.name.encode()).hexdigest(), "bytes": 1} for s in specs},
        "networks": {s.name: {"inputs": listed(s.inputs), "outputs": listed(s.outputs)} for s in specs},
    }


@pytest.fixture
def export_dir(tmp_path, info):
    folder = tmp_path / "export"
    write_manifest(folder, export_manifest(info))
    return folder


# ---- BuildConfig -------------------------------------------------------------------------------
def test_range_parse():
    assert Range.parse("256:512:768", "--height") == Range(256, 512, 768)
    assert Range.parse("512", "--height") == Range(512, 512, 512) and Range(512, 512, 512).static
    assert str(Range(256, 512, 768)) == "256:512:768" and str(Range(64, 64, 64)) == "64"


@pytest.mark.parametrize("text, message", [
    ("512:256:768", r"--height 512:256:768 must satisfy 1 <= MIN <= OPT <= MAX"),
    ("0", r"must satisfy 1 <= MIN"),
    ("a:b:c", r"must be MIN:OPT:MAX or one number"),
    ("256:512", r"must be MIN:OPT:MAX or one number"),
])
def test_range_parse_refuses_bad_ranges(text, message):
    with pytest.raises(BuildConfigError, match=message):
        Range.parse(text, "--height")


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="int8"), "precision 'int8' must be one of fp16, fp32"),
    (dict(optimization_level=6), "optimisation level 6 must be 0..5"),
    (dict(workspace_gib=0), "workspace limit 0 GiB must be positive"),
])
def test_build_config_refuses_bad_options(kwargs, message):
    with pytest.raises(BuildConfigError, match=message):
        BuildConfig(**kwargs)


def test_resolved_sizes_come_from_the_model(info):
    # tiny: 64 px default (sample_size 8 x VAE factor 8), smallest side 16 px (2 UNet levels)
    config = BuildConfig().resolved(info)
    assert (config.height, config.width, config.batch) == (Range(32, 64, 128), Range(32, 64, 128), Range(1, 1, 4))
    static = BuildConfig(batch=Range(1, 2, 4), height=Range(32, 48, 64), static=True).resolved(info)
    assert (static.height, static.width, static.batch) == (Range(48, 48, 48), Range(64, 64, 64), Range(2, 2, 2))


@pytest.mark.parametrize("height, message", [
    (Range(32, 60, 128), "every size must be a multiple of 8 pixels"),
    (Range(8, 64, 128), "this model's smallest image side is 16 pixels"),
])
def test_resolved_refuses_sizes_the_model_cannot_take(info, height, message):
    with pytest.raises(BuildConfigError, match=message):
        BuildConfig(height=height).resolved(info)


def test_build_cli_bad_range_exits_2(capsys):
    from sagrt.runtime.cli import main

    assert main(["build", "--model", "tiny", "--height", "512:256:768"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sagrt build: error: --height 512:256:768 must satisfy 1 <= MIN <= OPT <= MAX"


# ---- profiles ----------------------------------------------------------------------------------
def test_unet_profile_covers_degraded_and_cfg_passes(export_dir, info):
    plan = BuildPlan.make(export_dir, BuildConfig(batch=Range(1, 1, 4)), PLATFORM)
    unet, text, vae = plan.profiles["unet"], plan.profiles["text_encoder"], plan.profiles["vae_decoder"]
    # batch B (degraded pass) .. 2B (CFG pass), opt at the CFG pass; latent = pixels / 8: 32:64:128 -> 4:8:16
    assert unet["sample"] == [[1, 4, 4, 4], [2, 4, 8, 8], [8, 4, 16, 16]]
    assert unet["encoder_hidden_states"] == [[1, 77, 32], [2, 77, 32], [8, 77, 32]]
    assert unet["timestep"] == [[1], [1], [1]]
    assert text == {"input_ids": [[1, 77], [1, 77], [4, 77]]}
    assert vae == {"latent": [[1, 4, 4, 4], [1, 4, 8, 8], [4, 4, 16, 16]]}


def test_static_profile_keeps_both_unet_batches(export_dir):
    plan = BuildPlan.make(export_dir, BuildConfig(batch=Range(2, 2, 2), height=Range(48, 48, 48),
                                                  width=Range(64, 64, 64), static=True), PLATFORM)
    assert plan.profiles["unet"]["sample"] == [[2, 4, 6, 8], [4, 4, 6, 8], [4, 4, 6, 8]]
    assert plan.profiles["vae_decoder"]["latent"] == [[1, 4, 6, 8], [2, 4, 6, 8], [2, 4, 6, 8]]


# ---- cache keys, paths, plans ------------------------------------------------------------------
def test_cache_key_hashes_config_tensorrt_onnx_and_gpu():
    onnx, gpu = {"unet": "a" * 64, "vae_decoder": "b" * 64}, {"gpu": "NVIDIA H200", "compute_capability": "9.0"}
    key = cache_key(BuildConfig(), "10.8.0", onnx, gpu)
    assert len(key) == 16 and key == cache_key(BuildConfig(), "10.8.0", dict(reversed(onnx.items())), gpu)
    assert key == cache_key(BuildConfig(timing_cache="/tmp/other.cache"), "10.8.0", onnx, gpu)
    others = [cache_key(BuildConfig(precision="fp32"), "10.8.0", onnx, gpu),
              cache_key(BuildConfig(batch=Range(1, 2, 4)), "10.8.0", onnx, gpu),
              cache_key(BuildConfig(), "10.9.0", onnx, gpu),
              cache_key(BuildConfig(), "10.8.0", {**onnx, "unet": "c" * 64}, gpu),
              cache_key(BuildConfig(), "10.8.0", onnx, {**gpu, "gpu": "NVIDIA A100"})]
    assert len({key, *others}) == 6
    assert engine_filename("unet", "10.8.0.43") == "unet.trt10.8.0.43.plan"


def test_cache_key_follows_the_weights_stored_beside_a_graph(export_dir, info):
    """With external data the graph file only points at the weights: new weights in the same architecture keep
    unet.onnx's hash, and must still name a different build."""
    key = BuildPlan.make(export_dir, BuildConfig(), PLATFORM).key
    manifest = export_manifest(info)
    manifest["files"]["unet.onnx.data"] = {"sha256": "a" * 64, "bytes": 1}
    write_manifest(export_dir, manifest)
    with_data = BuildPlan.make(export_dir, BuildConfig(), PLATFORM)
    assert with_data.key != key
    assert with_data.manifest({n: {} for n in with_data.profiles})["onnx"]["unet"]["sha256"] == \
        f"{hashlib.sha256(b'unet').hexdigest()}+{'a' * 64}"
    manifest["files"]["unet.onnx.data"]["sha256"] = "b" * 64  # other weights, same graph file
    write_manifest(export_dir, manifest)
    assert BuildPlan.make(export_dir, BuildConfig(), PLATFORM).key not in (key, with_data.key)


def test_plan_refuses_wrong_precision_and_non_exports(export_dir, tmp_path):
    with pytest.raises(BuildError, match="the export in .* is fp16 but the build asks for fp32: export with "
                                         "--precision fp32"):
        BuildPlan.make(export_dir, BuildConfig(precision="fp32"), PLATFORM)
    with pytest.raises(BuildError, match="holds no sagrt ONNX export"):
        BuildPlan.make(tmp_path / "nothing", BuildConfig(), PLATFORM)


def engine_manifest(export_dir, config=BuildConfig()):
    plan = BuildPlan.make(export_dir, config, PLATFORM)
    files = {n: {"file": plan.engine_file(n), "sha256": "0" * 64, "bytes": 10} for n in plan.profiles}
    return plan, plan.manifest(files)


def test_engine_manifest_records_what_engines_depend_on(export_dir, tmp_path):
    plan, manifest = engine_manifest(export_dir)
    assert manifest["kind"] == "tensorrt" and manifest["cache_key"] == plan.key
    assert {k: manifest[k] for k in PLATFORM} == PLATFORM
    assert manifest["precision"] == "fp16" and manifest["onnx"]["unet"]["sha256"] == hashlib.sha256(b"unet").hexdigest()
    assert manifest["engines"]["unet"]["profile"] == plan.profiles["unet"]
    assert manifest["engines"]["unet"]["file"] == "unet.trt10.8.0.43.plan"
    assert BuildConfig.from_dict(manifest["build_config"]) == plan.config
    assert not plan.is_built(tmp_path / "engines")
    write_manifest(tmp_path / "engines", manifest)
    for entry in manifest["engines"].values():
        (tmp_path / "engines" / entry["file"]).write_bytes(b"x" * 10)
    assert plan.is_built(tmp_path / "engines")
    (tmp_path / "engines" / "unet.trt10.8.0.43.plan").write_bytes(b"x" * 4)  # truncated
    assert not plan.is_built(tmp_path / "engines")


def test_rebuild_command_round_trips_through_the_cli(export_dir, tmp_path):
    from sagrt.runtime.cli import build_parser
    from sagrt.runtime.commands.build import build_config

    config = BuildConfig(batch=Range(1, 2, 3), height=Range(32, 48, 64), optimization_level=4, workspace_gib=2.5,
                         timing_cache=str(tmp_path / "t.cache"))
    _, manifest = engine_manifest(export_dir, config)
    command = rebuild_command(manifest, tmp_path / "my engines")
    argv = shlex.split(command)
    assert argv[:2] == ["sagrt", "build"] and argv[-1] == "--force"
    args = build_parser().parse_args(argv[1:])
    assert args.out == str(tmp_path / "my engines") and args.model == "tiny"
    assert build_config(args) == BuildConfig.from_dict(manifest["build_config"])


# ---- manifest against this machine ---------------------------------------------------------------
def test_check_platform_names_what_differs_and_the_rebuild(export_dir, tmp_path):
    _, manifest = engine_manifest(export_dir)
    check_platform(manifest, PLATFORM, tmp_path / "engines")  # same machine: fine
    other = {**PLATFORM, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    with pytest.raises(EngineError) as err:
        check_platform(manifest, other, tmp_path / "engines")
    message = str(err.value)
    assert "\n" not in message
    assert "gpu: found 'NVIDIA H200', wanted 'NVIDIA A100-SXM4-80GB'" in message
    assert "compute_capability: found '9.0', wanted '8.0'" in message
    assert message.endswith(f"rebuild them here with: sagrt build --model tiny --out {tmp_path / 'engines'} "
                            "--precision fp16 --batch 1:1:4 --height 32:64:128 --width 32:64:128 "
                            "--optimization-level 3 --force")
    with pytest.raises(EngineError, match=r"tensorrt_version: found '10.8.0.43', wanted '10.9.0.1'"):
        check_platform(manifest, {**PLATFORM, "tensorrt_version": "10.9.0.1"}, tmp_path / "engines")


def test_missing_engine_manifest_says_how_to_build(tmp_path):
    with pytest.raises(EngineError, match=r"no finished TensorRT build in .*: build one with: sagrt build"):
        read_engine_manifest(tmp_path)


# ---- shape checks ----------------------------------------------------------------------------------
def test_shapes_inside_the_profile_pass(export_dir, tmp_path):
    plan, _ = engine_manifest(export_dir)
    profile = plan.profiles["unet"]
    for batch in (1, 2, 8):  # B and 2B of batch 1, and 2B of the largest batch 4
        check_shapes("unet", {"sample": (batch, 4, 5, 16), "timestep": (1,), "encoder_hidden_states": (batch, 77, 32)},
                     profile, lambda: pytest.fail("no rebuild needed"))


def test_shape_outside_the_profile_names_tensor_and_covering_build(export_dir, tmp_path):
    plan, manifest = engine_manifest(export_dir)
    shapes = {"sample": (16, 4, 8, 24), "timestep": (1,), "encoder_hidden_states": (16, 77, 32)}
    with pytest.raises(ProfileError) as err:
        check_shapes("unet", shapes, plan.profiles["unet"],
                     lambda: shape_rebuild_command(manifest, tmp_path / "engines", "unet", shapes))
    message = str(err.value)
    assert message.startswith("TensorRT engine unet: sample shape (16, 4, 8, 24) is outside the built profile "
                              "(1, 4, 4, 4)..(8, 4, 16, 16); rebuild with ranges that cover it: sagrt build")
    # 16 = 2B needs B up to 8; a latent width of 24 is 192 pixels
    assert "--batch 1:1:8 --height 32:64:128 --width 32:64:192" in message
    command = shlex.split(message.split("cover it: ")[1])
    from sagrt.runtime.cli import build_parser
    from sagrt.runtime.commands.build import build_config

    wider = build_config(build_parser().parse_args(command[1:]))
    profiles = build_profiles(plan.export, wider.resolved(ModelInfo(**plan.export["model_info"])), 8)
    check_shapes("unet", shapes, profiles["unet"], lambda: pytest.fail("the suggested build must cover the call"))


def test_shape_check_refuses_missing_inputs_and_wrong_rank(export_dir, tmp_path):
    plan, _ = engine_manifest(export_dir)
    with pytest.raises(ProfileError, match=r"TensorRT engine vae_decoder: input 'latent' missing"):
        check_shapes("vae_decoder", {"sample": (1, 4, 8, 8)}, plan.profiles["vae_decoder"], lambda: "")
    with pytest.raises(ProfileError, match=r"latent shape \(1, 4, 8\) is outside"):
        check_shapes("vae_decoder", {"latent": (1, 4, 8)}, plan.profiles["vae_decoder"], lambda: "sagrt build")


# ---- dtypes, outputs, progress -------------------------------------------------------------------------
def test_dtype_table_refuses_unbindable_types():
    assert set(TRT_TO_TORCH) >= {"FLOAT", "HALF", "INT32"}
    with pytest.raises(EngineError, match="TensorRT dtype FP8 has no torch equivalent"):
        torch_dtype(SimpleNamespace(name="FP8"))


def test_unet_outputs_must_carry_a_float32_attention_score():
    check_output_dtypes("unet", {"noise_pred": "HALF", "attn_score": "FLOAT"})
    check_output_dtypes("vae_decoder", {"image": "HALF"})
    with pytest.raises(BuildError, match="attn_score is HALF, not float32"):
        check_output_dtypes("unet", {"noise_pred": "HALF", "attn_score": "HALF"})
    with pytest.raises(BuildError, match="has no attn_score output"):
        check_output_dtypes("unet", {"noise_pred": "HALF"})


def test_build_progress_follows_nested_phases(capsys):
    progress = BuildProgress("build unet")
    progress.phase_start("Building engine", None, 3)
    progress.phase_start("Tactic selection", "Building engine", 10)
    assert progress.step_complete("Tactic selection", 4) is True
    assert progress.bars["Tactic selection"].n == 5
    progress.phase_finish("Tactic selection")
    progress.step_complete("Building engine", 0)
    assert list(progress.bars) == ["Building engine"] and progress.bars["Building engine"].n == 1
    progress.close()
    assert progress.bars == {}
    assert "build unet: Tactic selection" in capsys.readouterr().err


# ---- Engine life cycle (state checks run before any TensorRT call) ---------------------------------------
class FakeCudaEngine:
    """The ICudaEngine attributes Engine.load reads, for the life-cycle checks."""

    device_memory_size_v2 = 1024

    def __init__(self, io):
        self.io = io  # [(name, mode, dtype name)]
        self.num_io_tensors = len(io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return dict((n, m) for n, m, _ in self.io)[name]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=dict((n, d) for n, _, d in self.io)[name])


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))


def test_engine_life_cycle_is_state_checked(tmp_path):
    path = tmp_path / "vae_decoder.plan"
    path.write_bytes(b"plan")
    engine = Engine("vae_decoder", path, {"latent": [[1, 4, 4, 4], [1, 4, 8, 8], [4, 4, 16, 16]]})
    with pytest.raises(EngineStateError, match=r"TensorRT engine vae_decoder: infer\(\) needs the engine active, "
                                               r"it is new .*call load\(\) first"):
        engine.infer({"latent": torch.zeros(1, 4, 8, 8)}, stream=None)
    with pytest.raises(EngineStateError, match=r"activate\(\) needs the engine loaded"):
        engine.activate(torch.empty(1024, dtype=torch.uint8))

    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: FakeCudaEngine(
        [("latent", "in", "HALF"), ("image", "out", "HALF")]) if data == b"plan" else None)
    engine.load(FAKE_TRT, runtime)
    assert engine.state == "loaded" and engine.inputs == {"latent": torch.float16}
    assert engine.outputs == {"image": torch.float16}
    with pytest.raises(EngineStateError, match=r"load\(\) needs the engine new, it is loaded"):
        engine.load(FAKE_TRT, runtime)
    with pytest.raises(EngineStateError, match="device memory of 512 bytes, needs 1024"):
        engine.activate(torch.empty(512, dtype=torch.uint8))
    engine.activate(torch.empty(1024, dtype=torch.uint8))
    assert engine.state == "active"
    with pytest.raises(EngineStateError, match=r"inputs \['sample'\] given, expects \['latent'\]"):
        engine.infer({"sample": torch.zeros(1, 4, 8, 8)}, stream=None)
    # the profile check comes before any TensorRT call (the fake engine has no create_execution_context)
    with pytest.raises(ProfileError, match=r"vae_decoder: latent shape \(8, 4, 8, 8\) is outside the built profile "
                                           r"\(1, 4, 4, 4\)..\(4, 4, 16, 16\); .*: sagrt build --force"):
        engine.infer({"latent": torch.zeros(8, 4, 8, 8)}, stream=None)
    engine.deactivate()
    assert engine.state == "loaded" and engine.device_memory is None
    with pytest.raises(EngineStateError, match=r"deactivate\(\) needs the engine active"):
        engine.deactivate()


def test_engine_refuses_a_plan_tensorrt_cannot_load(tmp_path):
    path = tmp_path / "unet.plan"
    path.write_bytes(b"truncated")
    engine = Engine("unet", path, {})
    with pytest.raises(EngineError, match=r"TensorRT could not load .*unet.plan .*rebuild it with sagrt build --force"):
        engine.load(FAKE_TRT, SimpleNamespace(deserialize_cuda_engine=lambda data: None))


# ---- without TensorRT or a GPU ------------------------------------------------------------------------------
@needs_no_tensorrt
def test_build_without_tensorrt_is_a_one_line_error(capsys):
    from sagrt.runtime.cli import main

    assert main(["build", "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sagrt build: error: sagrt build needs TensorRT and an NVIDIA GPU")
    assert "pip install 'sagrt[tensorrt]'" in err


@needs_no_tensorrt
def test_generate_with_tensorrt_backend_fails_before_any_work(capsys, tmp_path):
    from sagrt.runtime.cli import main

    out = tmp_path / "images"
    assert main(["generate", "x", "--backend", "tensorrt", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend tensorrt needs TensorRT and an NVIDIA GPU" in err
    assert "pip install 'sagrt[tensorrt]'" in err
    assert not out.exists()


@needs_no_tensorrt
def test_auto_backend_falls_back_to_onnxruntime_here():
    from sagrt.runtime.backends import resolve_auto

    assert tensorrt_missing()
    assert resolve_auto("auto") == "onnxruntime"
    assert resolve_auto("torch") == "torch" and resolve_auto("tensorrt") == "tensorrt"


# ---- GPU: real engines (need CUDA, TensorRT and the ONNX export) ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'sagrt[tensorrt]')")
    pytest.importorskip("sagrt.export.onnx_export", reason="needs the ONNX export stage")
    from sagrt.engine.tensorrt_build import build_for_model

    config = BuildConfig(precision="fp32", batch=Range(1, 1, 2), height=Range(48, 64, 80), width=Range(48, 64, 80))
    return build_for_model("tiny", config, tmp_path_factory.mktemp("engines"), progress=False)


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions in torch for the duration of a test (cuDNN allows TF32 by default)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
def test_tensorrt_unet_matches_torch_fp32(tiny, tiny_engines, no_tf32):
    from sagrt.engine.tensorrt_runner import TensorRTRunners
    from sagrt.runtime.runners import TorchRunners

    import copy

    torch_runners = TorchRunners(copy.deepcopy(tiny), device="cuda")  # not the session's modules: CPU tests use them
    with TensorRTRunners(tiny_engines) as trt_runners:
        generator = torch.Generator(device="cuda").manual_seed(0)
        for batch, (h, w) in ((2, (8, 8)), (1, (6, 10)), (4, (10, 7))):  # 2B and B passes, non-square, odd
            sample = torch.randn(batch, 4, h, w, device="cuda", generator=generator)
            context = torch.randn(batch, 77, 32, device="cuda", generator=generator)
            t = torch.tensor(500, device="cuda")
            eps, score = trt_runners.unet(sample, t, context)
            eps_ref, score_ref = torch_runners.unet(sample, t, context)
            assert score.dtype == torch.float32 and score.shape == score_ref.shape
            # DESIGN.md's per-call bound (1e-4), and the score's informative part, its deviation from 1, on its own
            assert relative_error(eps, eps_ref) <= 1e-4 and relative_error(score, score_ref) <= 1e-4
            assert score_ref.std() > 1e-3 and relative_error(score - 1, score_ref - 1) <= 1e-3


@pytest.mark.gpu
def test_tensorrt_refuses_shapes_outside_the_profile_before_running(tiny_engines):
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    with TensorRTRunners(tiny_engines) as runners:
        sample = torch.zeros(6, 4, 8, 8, device="cuda")  # 2B = 6 > 2 x batch max 2
        with pytest.raises(ProfileError, match=r"sample shape \(6, 4, 8, 8\) is outside .* --batch 1:1:3"):
            runners.unet(sample, torch.tensor(1, device="cuda"), torch.zeros(6, 77, 32, device="cuda"))


def test_engines_answer_only_for_their_model(tmp_path):
    from sagrt.engine.tensorrt_runner import check_model

    check_model({"model_source": "tiny"}, "tiny", tmp_path)
    check_model({"model_source": str(tmp_path.resolve())}, str(tmp_path), tmp_path)
    with pytest.raises(EngineError, match=r"built for model 'tiny', not 'sd15': build engines for it with: "
                                          r"sagrt build --model sd15 --out NEW_DIR"):
        check_model({"model_source": "tiny"}, "sd15", tmp_path)


def load_gpu_check() -> dict:
    """benchmarks/gpu_check.py's globals (it is a script, not a package module)."""
    import runpy

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"), run_name="gpu_check")


def test_psnr_of_gpu_check():
    import numpy as np

    psnr = load_gpu_check()["psnr"]
    image = np.random.default_rng(0).random((1, 8, 8, 3))
    assert psnr(image, image) == float("inf")
    assert abs(psnr(image + 0.01, image) - 40.0) < 1e-9  # mse 1e-4 -> 40 dB


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the real check")
def test_gpu_check_records_skipped_steps_with_reasons(tmp_path):
    import json

    report_path = tmp_path / "check.json"
    assert load_gpu_check()["main"](["--presets", "tiny", "--json", str(report_path),
                                  "--work-dir", str(tmp_path / "work")]) == 0
    report = json.loads(report_path.read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["status"] for s in report["steps"]] == ["skipped"] * 4
    assert "TensorRT is not installed" in steps["export + build fp16 engines"]["reason"]
    assert steps["parity tensorrt vs torch"]["reason"] == "no torch image (skipped); no tensorrt image (skipped)"
    assert all(s["results"] == {} for s in report["steps"])  # nothing reported that was not measured
    assert report["machine"]["tensorrt"] is None
