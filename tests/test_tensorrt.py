"""TensorRT path up to the GPU boundary (CPU), and the GPU tests that need CUDA + TensorRT (skipped without).

The CPU tests use an export manifest made from export/specs.py for the tiny model, as the export writes it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import shlex
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import relative_error
from sagrt.engine.cuda_graphs import capture_graph
from sagrt.engine.profiles import (BuildConfig, BuildConfigError, ProfileError, Range, build_profiles, cache_key,
                                   check_shapes, engine_filename, pick_profile)
from sagrt.engine.tensorrt_build import (BuildError, BuildPlan, BuildProgress, check_output_dtypes, rebuild_command,
                                         tensorrt_missing)
from sagrt.engine.tensorrt_runner import (DeviceMemory, Engine, EngineError, EngineStateError, TRT_TO_TORCH, _key,
                                          check_platform, read_engine_manifest, shape_rebuild_command, torch_dtype)
from sagrt.export.artifacts import write_manifest
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.export.specs import text_encoder_spec, unet_spec, vae_decoder_spec
from sagrt.runners import ModelInfo

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
    (unet, unet_b), (text,), (vae,) = plan.profiles["unet"], plan.profiles["text_encoder"], plan.profiles["vae_decoder"]
    # batch B (degraded pass) .. 2B (CFG pass), opt at the CFG pass; latent = pixels / 8: 32:64:128 -> 4:8:16
    assert unet["sample"] == [[1, 4, 4, 4], [2, 4, 8, 8], [8, 4, 16, 16]]
    # the second profile: the same range, tuned for the degraded pass at B
    assert unet_b["sample"] == [[1, 4, 4, 4], [1, 4, 8, 8], [8, 4, 16, 16]]
    assert unet_b["encoder_hidden_states"] == [[1, 77, 32], [1, 77, 32], [8, 77, 32]]
    assert unet["encoder_hidden_states"] == [[1, 77, 32], [2, 77, 32], [8, 77, 32]]
    assert unet["timestep"] == [[1], [1], [1]]
    assert text == {"input_ids": [[1, 77], [1, 77], [4, 77]]}
    assert vae == {"latent": [[1, 4, 4, 4], [1, 4, 8, 8], [4, 4, 16, 16]]}


def test_static_profile_keeps_both_unet_batches(export_dir):
    plan = BuildPlan.make(export_dir, BuildConfig(batch=Range(2, 2, 2), height=Range(48, 48, 48),
                                                  width=Range(64, 64, 64), static=True), PLATFORM)
    assert [p["sample"] for p in plan.profiles["unet"]] == [[[2, 4, 6, 8], [4, 4, 6, 8], [4, 4, 6, 8]],
                                                            [[2, 4, 6, 8], [2, 4, 6, 8], [4, 4, 6, 8]]]
    assert plan.profiles["vae_decoder"][0]["latent"] == [[1, 4, 6, 8], [2, 4, 6, 8], [2, 4, 6, 8]]


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
    with pytest.raises(BuildError, match="the export in .* is fp16 but the build asks for fp32: make an fp32 "
                                         "export \\(sagrt export --precision fp32\\)"):
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
    assert manifest["engines"]["unet"]["profiles"] == plan.profiles["unet"]
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
    profile = plan.profiles["unet"][0]
    for batch in (1, 2, 8):  # B and 2B of batch 1, and 2B of the largest batch 4
        check_shapes("unet", {"sample": (batch, 4, 5, 16), "timestep": (1,), "encoder_hidden_states": (batch, 77, 32)},
                     profile, lambda: pytest.fail("no rebuild needed"))


def test_shape_outside_the_profile_names_tensor_and_covering_build(export_dir, tmp_path):
    plan, manifest = engine_manifest(export_dir)
    shapes = {"sample": (16, 4, 8, 24), "timestep": (1,), "encoder_hidden_states": (16, 77, 32)}
    with pytest.raises(ProfileError) as err:
        check_shapes("unet", shapes, plan.profiles["unet"][0],
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
    check_shapes("unet", shapes, profiles["unet"][0], lambda: pytest.fail("the suggested build must cover the call"))


def test_shape_check_refuses_missing_inputs_and_wrong_rank(export_dir, tmp_path):
    plan, _ = engine_manifest(export_dir)
    with pytest.raises(ProfileError, match=r"TensorRT engine vae_decoder: input 'latent' missing"):
        check_shapes("vae_decoder", {"sample": (1, 4, 8, 8)}, plan.profiles["vae_decoder"][0], lambda: "")
    with pytest.raises(ProfileError, match=r"latent shape \(1, 4, 8\) is outside"):
        check_shapes("vae_decoder", {"latent": (1, 4, 8)}, plan.profiles["vae_decoder"][0], lambda: "sagrt build")


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
class FakeContext:
    """The IExecutionContext calls Engine makes, recorded; scratch need grows with the batch."""

    def __init__(self, engine):
        self.engine, self.shapes, self.calls, self.profile = engine, {}, [], None

    def set_optimization_profile_async(self, index, stream_handle):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return tuple(shape) not in self.engine.refused_shapes

    def update_device_memory_size_for_shapes(self):
        return 1000 * self.shapes[self.engine.io[0][0]][0]  # 1000 bytes per batch item

    def set_device_memory(self, pointer, size):
        self.calls.append(("memory", pointer, size))

    def get_tensor_shape(self, name):
        return self.shapes[self.engine.io[0][0]]

    def set_tensor_address(self, name, pointer):
        self.calls.append(("address", name))

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute",))
        return True


class FakeCudaEngine:
    """The ICudaEngine calls Engine makes: I/O tables, profiles, contexts."""

    device_memory_size_v2 = 1 << 20

    def __init__(self, io, profiles=1):
        self.io = io  # [(name, mode, dtype name)]
        self.num_io_tensors, self.num_optimization_profiles = len(io), profiles
        self.refused_shapes, self.contexts = set(), []

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return dict((n, m) for n, m, _ in self.io)[name]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=dict((n, d) for n, _, d in self.io)[name])

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"  # sagrt gives every context its scratch memory
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"),
                           ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user-managed"))
VAE_PROFILE = {"latent": [[1, 4, 4, 4], [1, 4, 8, 8], [4, 4, 16, 16]]}


class FakeStream:
    """A stream handle that counts host synchronisations and records which streams it was ordered after."""

    cuda_stream = 0
    device = torch.device("cpu")

    def __init__(self):
        self.synchronized, self.waited_for = 0, []

    def synchronize(self):
        self.synchronized += 1

    def wait_stream(self, other):
        self.waited_for.append(other)


def loaded_engine(tmp_path, profiles=(VAE_PROFILE,), **kwargs) -> Engine:
    path = tmp_path / "vae_decoder.plan"
    path.write_bytes(b"plan")
    engine = Engine("vae_decoder", path, list(profiles), **kwargs)
    engine.load(FAKE_TRT, SimpleNamespace(deserialize_cuda_engine=lambda data: FakeCudaEngine(
        [("latent", "in", "FLOAT"), ("image", "out", "FLOAT")], len(profiles))))
    return engine


def test_engine_life_cycle_is_state_checked(tmp_path):
    path = tmp_path / "vae_decoder.plan"
    path.write_bytes(b"plan")
    engine = Engine("vae_decoder", path, [VAE_PROFILE])
    memory = DeviceMemory(torch.device("cpu"), FakeStream())
    with pytest.raises(EngineStateError, match=r"TensorRT engine vae_decoder: infer\(\) needs the engine active, "
                                               r"it is new .*call load\(\) first"):
        engine.infer({"latent": torch.zeros(1, 4, 8, 8)}, stream=None)
    with pytest.raises(EngineStateError, match=r"activate\(\) needs the engine loaded"):
        engine.activate(memory)

    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: FakeCudaEngine(
        [("latent", "in", "HALF"), ("image", "out", "HALF")]) if data == b"plan" else None)
    engine.load(FAKE_TRT, runtime)
    assert engine.state == "loaded" and engine.inputs == {"latent": torch.float16}
    assert engine.outputs == {"image": torch.float16}
    with pytest.raises(EngineStateError, match=r"load\(\) needs the engine new, it is loaded"):
        engine.load(FAKE_TRT, runtime)
    engine.activate(memory)
    assert engine.state == "active"
    with pytest.raises(EngineStateError, match=r"inputs \['sample'\] given, expects \['latent'\]"):
        engine.infer({"sample": torch.zeros(1, 4, 8, 8)}, stream=None)
    # the profile check comes before any TensorRT call
    with pytest.raises(ProfileError, match=r"vae_decoder: latent shape \(8, 4, 8, 8\) is outside the built profile "
                                           r"\(1, 4, 4, 4\)..\(4, 4, 16, 16\); .*: sagrt build --force"):
        engine.infer({"latent": torch.zeros(8, 4, 8, 8)}, stream=None)
    assert engine.engine.contexts == []
    engine.deactivate()
    assert engine.state == "loaded" and engine.memory is None
    with pytest.raises(EngineStateError, match=r"deactivate\(\) needs the engine active"):
        engine.deactivate()


def test_engine_refuses_a_plan_with_other_profiles_than_its_manifest(tmp_path):
    path = tmp_path / "unet.plan"
    path.write_bytes(b"plan")
    engine = Engine("unet", path, [VAE_PROFILE, VAE_PROFILE])
    with pytest.raises(EngineError, match=r"has 1 optimisation profile\(s\), its manifest lists 2: rebuild"):
        engine.load(FAKE_TRT, SimpleNamespace(deserialize_cuda_engine=lambda data: FakeCudaEngine(
            [("latent", "in", "FLOAT")], profiles=1)))


def test_engine_refuses_a_plan_tensorrt_cannot_load(tmp_path):
    path = tmp_path / "unet.plan"
    path.write_bytes(b"truncated")
    engine = Engine("unet", path, {})
    with pytest.raises(EngineError, match=r"TensorRT could not load .*unet.plan .*rebuild it with sagrt build --force"):
        engine.load(FAKE_TRT, SimpleNamespace(deserialize_cuda_engine=lambda data: None))


# ---- profiles per call, scratch memory, CUDA graphs (Engine on CPU stand-ins) ---------------------------------
def test_each_unet_call_runs_in_the_profile_tuned_for_its_batch(export_dir):
    plan, _ = engine_manifest(export_dir, BuildConfig(batch=Range(1, 2, 4)))
    profiles = plan.profiles["unet"]
    call = lambda b: {"sample": (b, 4, 8, 8), "timestep": (1,), "encoder_hidden_states": (b, 77, 32)}  # noqa: E731
    assert pick_profile(profiles, call(4)) == 0  # the CFG pass at 2B (B = 2)
    assert pick_profile(profiles, call(2)) == 1  # the degraded pass at B
    assert pick_profile(profiles, call(1)) == 1 and pick_profile(profiles, call(8)) == 0
    assert pick_profile(profiles, call(9)) == -1  # outside every profile
    assert pick_profile([profiles[0], profiles[0]], call(4)) == 0  # ties go to the first


def test_allocate_selects_the_profile_and_sizes_scratch_for_the_shapes(tmp_path):
    low = {"latent": [[1, 4, 4, 4], [1, 4, 8, 8], [4, 4, 16, 16]]}
    high = {"latent": [[1, 4, 4, 4], [4, 4, 8, 8], [4, 4, 16, 16]]}
    engine, stream = loaded_engine(tmp_path, profiles=(high, low)), FakeStream()
    memory = DeviceMemory(torch.device("cpu"), stream)
    engine.activate(memory)
    one = engine.allocate({"latent": (1, 4, 8, 8)}, stream)
    assert one.profile == 1 and one.memory_size == 1000 and memory.size == 1000 and stream.synchronized == 0
    assert one.context.calls[0] == ("memory", memory.data_ptr(), 1000)
    assert one.tensors["image"].shape == (1, 4, 8, 8)
    four = engine.allocate({"latent": (4, 4, 8, 8)}, stream)  # a larger shape: the buffer grows
    assert four.profile == 0 and memory.size == 4000 and memory.generation == 2
    assert stream.synchronized == 1  # the old buffer was freed only after the stream finished with it
    one.graph = "captured in the old buffer"
    engine._point_at_memory(one)  # infer does this before every call
    assert one.context.calls[-1] == ("memory", memory.data_ptr(), 4000) and one.graph is None
    engine.allocate({"latent": (2, 4, 8, 8)}, stream)  # smaller: the 4000-byte buffer serves it
    assert memory.size == 4000 and memory.generation == 2 and memory.size < engine.max_device_memory_size
    engine.deactivate()
    assert stream.synchronized == 2
    memory.release()
    assert memory.size == 0 and stream.synchronized == 3


def test_an_engine_that_needs_no_scratch_still_gets_a_buffer_to_point_at(tmp_path):
    memory = DeviceMemory(torch.device("cpu"))
    memory.reserve(0)
    assert memory.size == 1 and memory.generation == 1 and memory.data_ptr()
    memory.reserve(1)
    assert memory.generation == 1


def test_allocate_refuses_an_input_shape_tensorrt_rejects(tmp_path):
    engine, stream = loaded_engine(tmp_path), FakeStream()
    engine.activate(DeviceMemory(torch.device("cpu"), stream))
    engine.engine.refused_shapes.add((2, 4, 8, 8))
    with pytest.raises(EngineError, match=r"TensorRT engine vae_decoder refused input latent of shape "
                                          r"\(2, 4, 8, 8\) in profile 0 \(see the TensorRT log\): rebuild with"):
        engine.allocate({"latent": (2, 4, 8, 8)}, stream)


def test_shapes_kept_per_engine_are_bounded_least_recently_used_first(tmp_path):
    engine, stream = loaded_engine(tmp_path, max_shapes=2), FakeStream()
    engine.activate(DeviceMemory(torch.device("cpu"), stream))
    for batch in (1, 2):
        engine.allocate({"latent": (batch, 4, 8, 8)}, stream)
    engine.bindings[_key({"latent": (1, 4, 8, 8)})] = engine.bindings.pop(_key({"latent": (1, 4, 8, 8)}))  # used
    waits = stream.synchronized
    engine.allocate({"latent": (3, 4, 8, 8)}, stream)
    assert [dict(k)["latent"][0] for k in engine.bindings] == [1, 3]  # batch 2 was the least recently used
    assert stream.synchronized > waits  # its buffers were dropped after the stream finished with them


def test_infer_orders_streams_reuses_shapes_and_hands_out_copies(tmp_path, monkeypatch):
    """Engine.infer on CPU stand-ins for the two CUDA-only calls it makes (the caller's stream, and making the
    engine's stream current): the fake context doubles its input."""
    caller, stream = FakeStream(), FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    engine = loaded_engine(tmp_path, cuda_graph=False)
    engine.activate(DeviceMemory(torch.device("cpu"), stream))

    def execute(handle, context):
        binding = next(b for b in engine.bindings.values() if b.context is context)
        binding.tensors["image"].copy_(binding.tensors["latent"] * 2)
        context.calls.append(("execute",))
        return True

    def infer(batch):
        x = torch.randn(batch, 4, 8, 8)
        return x, engine.infer({"latent": x}, stream)["image"]

    original_allocate = engine.allocate

    def allocate(shapes, s):  # the fake context learns to compute once it exists
        binding = original_allocate(shapes, s)
        binding.context.execute_async_v3 = functools.partial(execute, context=binding.context)
        return binding

    engine.allocate = allocate
    x, out = infer(1)
    torch.testing.assert_close(out, 2 * x)
    assert stream.waited_for == [caller] and caller.waited_for == [stream]  # engine after caller, caller after engine
    out.zero_()  # a copy: the engine's own output buffer is untouched
    assert engine.bindings[_key({"latent": (1, 4, 8, 8)})].tensors["image"].abs().sum() > 0
    x, out = infer(1)
    torch.testing.assert_close(out, 2 * x)
    assert len(engine.engine.contexts) == 1  # the shape's context and buffers are reused
    infer(4)  # a larger shape grows the scratch buffer ...
    x, out = infer(1)  # ... and the first shape's context is pointed at the new one before it runs
    small = engine.bindings[_key({"latent": (1, 4, 8, 8)})]
    assert small.memory_generation == engine.memory.generation == 2 and small.context.calls[-2][0] == "memory"
    torch.testing.assert_close(out, 2 * x)
    assert [dict(k)["latent"][0] for k in engine.bindings] == [4, 1]  # most recently used last


class StandInGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def stand_in_capture(log: list):
    """A stand-in for torch.cuda.graph: raises at the capture's end when the captured step broke the capture,
    as torch does when cudaStreamEndCapture reports an invalidated capture."""

    @contextlib.contextmanager
    def graph_context(graph, stream=None, capture_error_mode="global"):
        log.append(("begin", capture_error_mode))
        yield
        if "broken" in log:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        log.append("end")

    return graph_context


def test_cuda_graph_capture_failure_falls_back_to_plain_execution(tmp_path):
    log = []
    capture = functools.partial(capture_graph, graph_factory=StandInGraph, graph_context=stand_in_capture(log),
                                clear_error=lambda: log.append("cleared"))
    engine, stream = loaded_engine(tmp_path, capture=capture), FakeStream()
    engine.activate(DeviceMemory(torch.device("cpu"), stream))
    binding = engine.allocate({"latent": (1, 4, 8, 8)}, stream)
    enqueue = binding.context.execute_async_v3

    def capture_breaking_step(handle):  # e.g. an enqueue that synchronises while the stream captures
        if log and log[-1] == ("begin", "thread_local"):
            log.append("broken")
        return enqueue(handle)

    binding.context.execute_async_v3 = capture_breaking_step
    with pytest.warns(RuntimeWarning, match=r"vae_decoder: CUDA graph capture failed \(RuntimeError: CUDA error: "
                                            r"operation not permitted when stream is capturing\); running shape "
                                            r"latent \(1, 4, 8, 8\).* without a graph"):
        engine._execute(binding, stream)
    assert log == [("begin", "thread_local"), "broken", "cleared"]
    assert binding.graph is None and binding.graph_error.startswith("RuntimeError")
    executed = lambda: sum(call == ("execute",) for call in binding.context.calls)  # noqa: E731
    assert executed() == 2  # the plain run, and the enqueue under the broken capture
    engine._execute(binding, stream)  # later calls run plainly, without trying to capture again
    engine._execute(binding, stream)
    assert executed() == 4 and binding.runs == 3 and len(log) == 3


def test_cuda_graph_is_captured_after_one_plain_run_then_replayed(tmp_path):
    log = []
    capture = functools.partial(capture_graph, graph_factory=StandInGraph, graph_context=stand_in_capture(log))
    engine, stream = loaded_engine(tmp_path, capture=capture), FakeStream()
    engine.activate(DeviceMemory(torch.device("cpu"), stream))
    binding = engine.allocate({"latent": (1, 4, 8, 8)}, stream)
    for _ in range(3):
        engine._execute(binding, stream)
    assert log == [("begin", "thread_local"), "end"] and binding.graph.replays == 2 and binding.runs == 1
    off = loaded_engine(tmp_path, capture=capture, cuda_graph=False)
    off.activate(DeviceMemory(torch.device("cpu"), stream))
    plain = off.allocate({"latent": (1, 4, 8, 8)}, stream)
    off._execute(plain, stream)
    assert plain.graph is None and len(log) == 2  # the switch turns capture off


def test_capture_reports_an_enqueue_that_fails_under_capture():
    log = []
    captured = capture_graph(lambda: False, None, graph_factory=StandInGraph, graph_context=stand_in_capture(log),
                             clear_error=lambda: log.append("cleared"))
    assert captured.graph is None and captured.error == "CaptureBroken: the enqueue under capture returned False"
    assert log[-1] == "cleared"


# ---- the loop keeps the GPU queue full: timing by events, no host reads of GPU scalars ----------------------------
def test_stage_clock_gives_the_time_between_marks():
    from sagrt.runtime.timing import StageClock

    clock = StageClock(torch.device("cpu"))
    assert clock.durations() == []
    clock.mark("start")
    time.sleep(0.01)
    clock.mark("text")
    clock.mark("step")
    (first, text), (second, step) = clock.durations()
    assert (first, second) == ("text", "step") and text >= 0.01 and 0 <= step < text


def test_pipeline_timings_come_from_one_clock(tiny):
    from sagrt.runtime.pipeline import SAGPipeline
    from sagrt.runtime.torch_runners import TorchRunners

    pipe = SAGPipeline(TorchRunners(tiny), tiny.tokenizer, tiny.scheduler, ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    wall, t = time.perf_counter() - start, pipe.timings
    assert len(t.steps) == 3 and all(s > 0 for s in t.steps) and t.text > 0 and t.decode > 0
    assert t.text + sum(t.steps) + t.decode <= t.total <= wall


def test_schedule_scalars_stay_host_scalars_for_gpu_math(tiny):
    from sagrt.runtime.schedulers import alphas_cumprod_at, scalar_like

    like = torch.zeros(2, dtype=torch.float16)
    value = scalar_like(torch.tensor(0.5, dtype=torch.float64), like)
    assert value.dtype == torch.float16 and value.device.type == "cpu" and value.dim() == 0
    scheduler = copy.deepcopy(tiny.scheduler)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    assert alphas_cumprod_at(scheduler, t) == scheduler.alphas_cumprod[int(t)]
    assert alphas_cumprod_at(scheduler, int(t)) == scheduler.alphas_cumprod[int(t)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_sag_math_reads_nothing_back_from_the_gpu(tiny, name):
    """x0, eps and the degraded input of a step on CUDA with a CUDA timestep: no synchronising call (torch's sync
    debug mode turns one into an error). The scheduler tables reach the GPU during a first, warm-up call."""
    from sagrt.runtime import schedulers as sched

    scheduler = sched.make_scheduler(name, tiny.scheduler.config)
    scheduler.set_timesteps(4, device="cuda")
    x, eps = torch.randn(1, 4, 8, 8, device="cuda"), torch.randn(1, 4, 8, 8, device="cuda")
    t = scheduler.timesteps[1]
    if hasattr(scheduler, "_step_index"):  # sigma schedulers read their sigma by step index
        scheduler._step_index = 1
    sched.renoise(scheduler, *sched.predict_x0_eps(scheduler, x, eps, t), t)  # warm-up: tables move once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sched.renoise(scheduler, *sched.predict_x0_eps(scheduler, x, eps, t), t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- fp16 export: normalisations, SAG softmax and score in float32 ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_fp16(tiny, tmp_path_factory):
    from sagrt.export.onnx_export import export_model

    return export_model(tiny, tmp_path_factory.mktemp("tiny-fp16"), precision="fp16", progress=False)


@pytest.mark.parametrize("network", ["unet", "vae_decoder", "text_encoder"])
def test_fp16_export_normalises_in_float32(tiny_fp16, network):
    import onnx

    from sagrt.export.trt_compat import check_normalization_precision, tensorrt_findings

    model = onnx.load(str(tiny_fp16 / f"{network}.onnx"), load_external_data=False)
    assert any(node.op_type in ("InstanceNormalization", "LayerNormalization") for node in model.graph.node)
    assert check_normalization_precision(model) == [] and tensorrt_findings(model) == []
    layer_norms = [node for node in model.graph.node if node.op_type == "LayerNormalization"]
    # stash_type float32 (the default, 1) on float32 input: the parser's compute precision is the input's own
    assert all(a.i == 1 for node in layer_norms for a in node.attribute if a.name == "stash_type")


def test_fp16_unet_runs_only_the_sag_softmax_in_float32(tiny_fp16):
    import onnx

    from sagrt.export.trt_compat import tensor_types

    model = onnx.load(str(tiny_fp16 / "unet.onnx"), load_external_data=False)
    types = tensor_types(model)
    softmax = [types[node.input[0]] for node in model.graph.node if node.op_type == "Softmax"]
    assert softmax.count(onnx.TensorProto.FLOAT) == 1  # the SAG layer's; the others stay fp16 for speed
    assert softmax.count(onnx.TensorProto.FLOAT16) == len(softmax) - 1 > 0
    output = {v.name: v.type.tensor_type.elem_type for v in model.graph.output}
    assert output == {"noise_pred": onnx.TensorProto.FLOAT16, "attn_score": onnx.TensorProto.FLOAT}


def test_normalisation_check_names_an_fp16_layer_norm():
    import onnx

    from sagrt.export.trt_compat import check_normalization_precision

    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, 4, 8])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [1, 4, 8])
    scale = h.make_tensor("scale", onnx.TensorProto.FLOAT16, [8], [1.0] * 8)
    node = h.make_node("LayerNormalization", ["x", "scale"], ["y"], name="ln", axis=-1)
    model = h.make_model(h.make_graph([node], "g", [x], [y], [scale]), opset_imports=[h.make_opsetid("", 17)])
    (finding,) = check_normalization_precision(model)
    assert str(finding) == "LayerNormalization node 'ln': input 'x' is FLOAT16, not FLOAT: export the normalisation " \
                           "in float32"


def test_fp16_export_of_tiny_stays_near_fp32_torch_on_onnxruntime(tiny, tiny_fp16):
    """engine/precision.py's report on the tiny model (the `small` measurement is benchmarks/fp16_cpu.py and the
    slow test below): every network finite, the score float32, the VAE above docs/design.md's 30 dB."""
    from sagrt.engine.onnxruntime_runner import OrtRunners
    from sagrt.engine.precision import compare_networks
    from sagrt.runtime.torch_runners import TorchRunners

    report = compare_networks(OrtRunners(tiny_fp16, ["cpu"], fused_attention=False), TorchRunners(tiny),
                              ModelInfo.of(tiny), 64, 64, timesteps=(500,))
    unet, vae = report["unet"], report["vae_decoder"]
    assert all(c["score_dtype"] == "float32" for c in unet["calls"]) and [c["batch"] for c in unet["calls"]] == [1, 2]
    assert unet["nan"] == unet["inf"] == vae["nan"] == vae["inf"] == 0
    assert unet["worst_noise_pred"] < 1e-2 and unet["worst_attn_score"] < 1e-3
    assert vae["passed"] and report["text_encoder"]["relative_error"] < 1e-2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SAGRT_SLOW"), reason="about a minute on 2 cores: SAGRT_SLOW=1 runs it "
                    "(benchmarks/results/fp16-cpu-small.json has its numbers)")
def test_fp16_export_of_small_stays_within_the_fp16_bound_on_onnxruntime(tmp_path):
    """docs/design.md's fp16 bound (image PSNR >= 30 dB) on the VAE of `small`, and the UNet's noise and mask close to
    fp32 torch: the fp16 graph TensorRT builds from, run by ONNX Runtime's CPU provider (see benchmarks/fp16_cpu.py
    for what that provider computes in fp16)."""
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "fp16_cpu.py"))
    report = script["fp16_report"]("small", 256, tmp_path / "export")
    unet, vae = report["unet"], report["vae_decoder"]
    assert unet["nan"] == unet["inf"] == vae["nan"] == vae["inf"] == 0
    assert vae["psnr_db"] >= 30.0 and unet["worst_noise_pred"] < 1e-2 and unet["lowest_mask_agreement"] >= 0.99


# ---- SAG mask agreement (parity and gpu_check) -------------------------------------------------------------------
def test_mask_agreement_counts_positions_on_the_same_side_of_the_threshold():
    from sagrt.engine.precision import mask_agreement as call_agreement
    from sagrt.runtime.commands.parity import mask_agreement

    reference = torch.tensor([[0.5, 0.999, 1.001, 2.0]])
    fp16 = torch.tensor([[0.5, 1.0001, 1.001, 2.0]])  # one score rounded across the threshold
    assert call_agreement(fp16, reference) == 0.75 and call_agreement(reference, reference) == 1.0
    assert mask_agreement([{"mask_diff": (1, 4)}, {"mask_diff": (0, 4)}]) == 7 / 8
    assert mask_agreement([]) == 1.0


def test_parity_command_reports_mask_agreement(tiny_onnx, capsys):
    from sagrt.runtime.cli import main

    code = main(["parity", "--model", "tiny", "--export-dir", str(tiny_onnx), "--steps", "2", "--height", "64",
                 "--width", "64"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and "SAG mask agreement 100.0000% (0 position(s) differ): ok" in last


# ---- builder settings --------------------------------------------------------------------------------------
class FakeBuilderConfig:
    """IBuilderConfig's timing-cache and flag calls; a cache is accepted when its bytes say 'ours'."""

    def __init__(self):
        self.flags, self.preview, self.cache = [], {}, None
        self.builder_optimization_level = None

    def create_timing_cache(self, data):
        return SimpleNamespace(data=bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache.data not in (b"", b"ours"):
            return False
        self.cache = cache
        return True

    def clear_flag(self, flag):
        self.flags.append(("clear", flag))

    def set_preview_feature(self, feature, on):
        self.preview[feature] = on


def test_a_foreign_timing_cache_is_kept_and_refused_when_named(tmp_path):
    from sagrt.engine.tensorrt_build import load_timing_cache

    named = tmp_path / "shared.cache"
    named.write_bytes(b"from an A100")
    with pytest.raises(BuildError, match=r"timing cache .*shared.cache was written by another GPU or TensorRT "
                                         r"version \(or is damaged\), and sagrt will not overwrite it: pass another "
                                         r"--timing-cache FILE, or delete it"):
        load_timing_cache(None, FakeBuilderConfig(), named, own=False)
    assert named.read_bytes() == b"from an A100"
    config = FakeBuilderConfig()
    assert load_timing_cache(None, config, named, own=True).data == b"" and config.cache.data == b""
    named.write_bytes(b"ours")
    assert load_timing_cache(None, FakeBuilderConfig(), named, own=False).data == b"ours"
    assert load_timing_cache(None, FakeBuilderConfig(), tmp_path / "new.cache", own=False).data == b""


def test_builder_asks_for_scratch_sized_by_shapes_where_tensorrt_has_it():
    from sagrt.engine.tensorrt_build import configure

    trt = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32="tf32"), MemoryPoolType=SimpleNamespace(WORKSPACE="ws"),
                          PreviewFeature=SimpleNamespace(RUNTIME_ACTIVATION_RESIZE_10_10="resize"))
    config = FakeBuilderConfig()
    configure(trt, config, BuildConfig(precision="fp32", optimization_level=4))
    assert config.preview == {"resize": True} and config.flags == [("clear", "tf32")]
    assert config.builder_optimization_level == 4
    older = FakeBuilderConfig()  # TensorRT before 10.10 has no such preview feature
    configure(SimpleNamespace(**{**vars(trt), "PreviewFeature": SimpleNamespace()}), older, BuildConfig())
    assert older.preview == {} and older.flags == []


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
    assert main(["generate", "--model", "tiny", "x", "--backend", "tensorrt", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend tensorrt needs TensorRT and an NVIDIA GPU" in err
    assert "pip install 'sagrt[tensorrt]'" in err
    assert not out.exists()


@needs_no_tensorrt
def test_auto_backend_falls_back_to_onnxruntime_here():
    from sagrt.runtime.backends import resolve_backend

    assert tensorrt_missing()
    assert resolve_backend("auto").name == "onnxruntime"
    assert resolve_backend("torch").name == "torch" and resolve_backend("tensorrt").name == "tensorrt"


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
    from sagrt.runtime.torch_runners import TorchRunners

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
            # docs/design.md's per-call bound (1e-4), and the score's informative part, its deviation from 1, on its own
            assert relative_error(eps, eps_ref) <= 1e-4 and relative_error(score, score_ref) <= 1e-4
            assert score_ref.std() > 1e-3 and relative_error(score - 1, score_ref - 1) <= 1e-3


@pytest.mark.gpu
def test_tensorrt_refuses_shapes_outside_the_profile_before_running(tiny_engines):
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    with TensorRTRunners(tiny_engines) as runners:
        sample = torch.zeros(6, 4, 8, 8, device="cuda")  # 2B = 6 > 2 x batch max 2
        with pytest.raises(ProfileError, match=r"sample shape \(6, 4, 8, 8\) is outside .* --batch 1:1:3"):
            runners.unet(sample, torch.tensor(1, device="cuda"), torch.zeros(6, 77, 32, device="cuda"))


@pytest.mark.gpu
def test_forced_capture_failure_falls_back_to_plain_execution_on_the_gpu(tiny_engines):
    """A capture broken for real (a device synchronisation while the stream captures) leaves the engine running
    plainly, with the same outputs, and torch's CUDA state usable."""
    from sagrt.engine.tensorrt_runner import TensorRTRunners

    sample, context = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 77, 32, device="cuda")
    t = torch.tensor(10, device="cuda")
    with TensorRTRunners(tiny_engines, cuda_graph=False) as plain, TensorRTRunners(tiny_engines) as broken:
        expected = plain.unet(sample, t, context)[0]
        broken.engines["unet"].capture = lambda enqueue, stream: capture_graph(
            lambda: (torch.cuda.synchronize(), enqueue())[1], stream)
        with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
            first = broken.unet(sample, t, context)[0]
        later = broken.unet(sample, t, context)[0]
        bindings = list(broken.engines["unet"].bindings.values())
        assert bindings and all(b.graph is None and b.graph_error for b in bindings)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(later, expected)
    assert torch.ones(4, device="cuda").sum().item() == 4.0


def test_engines_answer_only_for_their_model(tmp_path):
    from sagrt.engine.tensorrt_runner import check_built_from

    check_built_from({"model_source": "tiny"}, "tiny", tmp_path)
    check_built_from({"model_source": str(tmp_path.resolve())}, str(tmp_path), tmp_path)
    with pytest.raises(EngineError, match=r"built for model 'tiny', not 'sd15': build engines for it with: "
                                          r"sagrt build --model sd15 --out NEW_DIR"):
        check_built_from({"model_source": "tiny"}, "sd15", tmp_path)


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
def test_gpu_check_records_skipped_steps_with_reasons(tmp_path, capsys):
    import json

    report_path = tmp_path / "check.json"
    assert load_gpu_check()["main"](["--presets", "tiny", "--json", str(report_path),
                                     "--work-dir", str(tmp_path / "work")]) == 0
    report = json.loads(report_path.read_text())
    steps = {s["name"]: s for s in report["steps"]}
    packages = steps.pop("packages")  # runs everywhere: the versions a GPU run needs to be read by
    assert packages["status"] == "ran" and packages["results"]["onnxruntime_distributions"] == ["onnxruntime"]
    assert packages["results"]["one_onnxruntime"] is True and packages["results"]["versions"]["torch"]
    assert all(s["status"] == "skipped" and s["results"] == {} for s in steps.values())  # nothing made up
    assert steps["pytest -m gpu"]["reason"] == "no CUDA GPU is visible to torch" or "CPU-only" in \
        steps["pytest -m gpu"]["reason"]
    assert "TensorRT is not installed" in steps["build fp16 engines"]["reason"]
    assert steps["end to end 64x64 50 steps vs eager diffusers SAG"]["reason"] == "no engines (build did not run)"
    assert steps["memory returned after close"]["reason"] == "load did not run"
    assert list(steps)[-1] == "parse fp32" and report["machine"]["tensorrt"] is None
    assert report["settings"]["steps"] == 50 and report["settings"]["psnr_bound_db"] == 30.0


def test_gpu_check_stops_starting_steps_when_its_budget_is_spent(tmp_path):
    import json

    report_path = tmp_path / "check.json"
    load_gpu_check()["main"](["--presets", "tiny", "--json", str(report_path), "--budget-s", "0"])
    packages = json.loads(report_path.read_text())["steps"][0]
    assert packages["name"] == "packages" and packages["status"] == "skipped"
    assert packages["reason"] == "the time budget (--budget-s) was spent"


# ---- packages: one ONNX Runtime, TensorRT for torch's CUDA ------------------------------------------------------
def fake_distribution(site: Path, name: str, version: str, module: str) -> None:
    """A dist-info as pip writes it, providing top-level `module` (what importlib.metadata reads)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{info.name}/METADATA,,\n")


def test_pyproject_gpu_install_holds_one_onnxruntime_and_pins_tensorrt_to_cuda12():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    runtimes = lambda reqs: {r.split(">")[0].split("=")[0].split("<")[0] for r in reqs  # noqa: E731
                             if r.startswith("onnxruntime")}
    extras = project["optional-dependencies"]
    assert runtimes(project["dependencies"]) == set()
    assert runtimes(extras["cpu"]) == {"onnxruntime"} and runtimes(extras["gpu"]) == {"onnxruntime-gpu"}
    assert runtimes(extras["tensorrt"]) == {"onnxruntime-gpu"} and runtimes(extras["test"]) == set()
    assert "tensorrt-cu12>=10.1,<11" in extras["tensorrt"]
    assert not any(r.split(">")[0] == "tensorrt" for r in extras["tensorrt"])  # the bare package follows CUDA 13


def test_two_onnxruntimes_installed_are_named_in_one_line():
    from sagrt.engine.packages import onnxruntime_conflict

    assert onnxruntime_conflict(["onnxruntime"]) is None and onnxruntime_conflict([]) is None
    message = onnxruntime_conflict(["onnxruntime", "onnxruntime-gpu"])
    assert "\n" not in message and message.startswith("onnxruntime and onnxruntime-gpu are installed together")
    assert message.endswith("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")


def test_sagrt_warns_in_one_line_when_both_onnxruntimes_are_installed(tmp_path, monkeypatch, capsys):
    from sagrt.runtime.cli import main

    fake_distribution(tmp_path, "onnxruntime-gpu", "1.20.0", "onnxruntime")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["build", "--model", "tiny", "--height", "512:256:768"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("sagrt: warning: onnxruntime and onnxruntime-gpu are installed together")
    assert lines[1:] == ["sagrt build: error: --height 512:256:768 must satisfy 1 <= MIN <= OPT <= MAX"]


def test_tensorrt_cuda_major_comes_from_the_wheel_name(tmp_path, monkeypatch):
    from sagrt.engine.packages import cuda_major_mismatch, tensorrt_cuda_major

    assert tensorrt_cuda_major(["tensorrt-cu12-bindings"]) == 12 and tensorrt_cuda_major(["tensorrt"]) is None
    fake_distribution(tmp_path, "tensorrt-cu13-bindings", "10.13.0", "tensorrt")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tensorrt_cuda_major() == 13
    assert cuda_major_mismatch(12, "12.8") is None and cuda_major_mismatch(None, "12.8") is None
    assert cuda_major_mismatch(12, None) is None
    message = cuda_major_mismatch(13, "12.8")
    assert message == ("TensorRT is built for CUDA 13 while torch is built for CUDA 12.8 (install the TensorRT of "
                       "torch's CUDA: pip uninstall -y tensorrt-cu13 && pip install 'tensorrt-cu12>=10.1,<11')")


def test_tensorrt_for_another_cuda_major_is_refused_in_one_line(tmp_path, monkeypatch):
    """A stand-in tensorrt module whose wheel says CUDA 13, beside a torch built for CUDA 12.8."""
    import sys

    from sagrt.engine.tensorrt_build import TensorRTUnavailable, require_tensorrt

    fake_distribution(tmp_path, "tensorrt-cu13-bindings", "10.13.0", "tensorrt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "TensorRT is built for CUDA 13 while torch is built for CUDA 12.8" in tensorrt_missing()[0]
    with pytest.raises(TensorRTUnavailable) as err:
        require_tensorrt("--backend tensorrt")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--backend tensorrt needs TensorRT and an NVIDIA GPU, but ")
    assert "pip install 'tensorrt-cu12>=10.1,<11'" in message

