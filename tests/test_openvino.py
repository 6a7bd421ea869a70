"""The openvino backend: fp32 parity with torch (per network and whole loop), bf16 against diffusers' own eager bf16,
the SAG signal's precision under bf16, the compiled cache, and one-line errors for what a user can get wrong."""

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("openvino", reason='the openvino backend needs OpenVINO (pip install ".[openvino]")')

from conftest import relative_error  # noqa: E402
from sagrt.bench.config import BenchError, parse_backend_spec  # noqa: E402
from sagrt.engine.openvino_runner import (OpenVinoError, OvRunners, check_precision, new_core,  # noqa: E402
                                          phases_from_input, read_graph)
from sagrt.export import artifacts  # noqa: E402
from sagrt.runtime import SAGPipeline  # noqa: E402
from sagrt.runtime.backends import BackendError, resolve_backend  # noqa: E402
from sagrt.runtime.cli import main  # noqa: E402
from sagrt.metrics import psnr_db  # noqa: E402
from sagrt.runners import ModelInfo  # noqa: E402
from sagrt.runtime.torch_runners import TorchRunners  # noqa: E402

CALL_BOUND = 1e-5  # per network call, fp32 (docs/design.md: 1e-4; measured ~1.5e-6)
LOOP_BOUND = 1e-4  # final latents after the whole loop, fp32 (docs/design.md: 1e-3; measured ~1.5e-6)
HAS_BF16 = "BF16" in new_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bfloat16 support (OpenVINO capabilities)")


@pytest.fixture(scope="module")
def ov_export(tiny_onnx, tmp_path_factory):
    """A copy of the tiny export: the openvino backend writes its compiled cache beside the graphs."""
    folder = tmp_path_factory.mktemp("tiny-openvino") / "export"
    shutil.copytree(tiny_onnx, folder)
    return folder


@pytest.fixture(scope="module")
def ov_fp32(ov_export):
    return OvRunners(ov_export, "fp32", threads=1)


@pytest.fixture(scope="module")
def ov_bf16(ov_export):
    if not HAS_BF16:
        pytest.skip("this CPU has no bfloat16 support (OpenVINO capabilities)")
    return OvRunners(ov_export, "bf16", threads=1)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def pipeline(backend, export_dir=None, scheduler="ddim", **options):
    if backend == "openvino":
        options = {"export_dir": export_dir, "threads": 1, **options}
    pipe = SAGPipeline.from_pretrained("tiny", backend=backend, scheduler=scheduler, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- fp32: docs/design.md's engine bounds ------------------------------------------------------------
def test_fp32_network_calls_match_torch(tiny, ov_fp32):
    reference = TorchRunners(tiny)
    gen = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 591, (2, 77), generator=gen)
    sample, context = torch.randn(2, 4, 9, 7, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        for clip_skip in (None, 0, 1):
            assert relative_error(ov_fp32.encode_text(input_ids, clip_skip),
                                  reference.encode_text(input_ids, clip_skip)) <= CALL_BOUND
        for a, b in zip(ov_fp32.unet(sample, torch.tensor(981.0), context), reference.unet(sample, 981.0, context)):
            assert a.dtype == torch.float32 and a.shape == b.shape and relative_error(a, b) <= CALL_BOUND
        image = ov_fp32.decode(sample)
        assert image.shape == (2, 3, 72, 56) and relative_error(image, reference.decode(sample)) <= CALL_BOUND
    assert ov_fp32.info == ModelInfo.of(tiny) and ov_fp32.name == "openvino"


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
def test_fp32_whole_loop_matches_torch(ov_export, scheduler):
    latents = {}
    for backend in ("torch", "openvino"):
        pipe = pipeline(backend, ov_export, scheduler)
        latents[backend] = pipe(["a photo of a cat", "a red car"], negative_prompt=["blurry", "dark"], height=64,
                                width=96, num_inference_steps=5, sag_scale=0.75, output_type="latent",
                                generator=torch.Generator().manual_seed(11)).images
    assert relative_error(latents["openvino"], latents["torch"]) <= LOOP_BOUND


def test_timestep_phase_rewiring_changes_no_value(ov_export):
    """phases_from_input (applied under bf16) computes the same UNet in f32: same outputs, one new node."""
    import numpy as np

    core = new_core()
    plain, rewired = read_graph(core, ov_export / "unet.onnx"), read_graph(core, ov_export / "unet.onnx")
    assert phases_from_input(rewired) == 2  # Sin and Cos of the timestep embedding
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((3, 4, 9, 7), np.float32), np.array([947.3], np.float32),
             rng.standard_normal((3, 77, 32), np.float32)]
    expected = core.compile_model(plain, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)
    got = core.compile_model(rewired, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)
    for index in range(2):
        assert np.array_equal(expected[index], got[index])


# ---- bf16: the SAG signal and the honest bound ----------------------------------------------------
@needs_bf16
def test_bf16_keeps_the_sag_signal_in_float32(tiny, ov_bf16):
    gen = torch.Generator().manual_seed(5)
    sample, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    noise_pred, score = ov_bf16.unet(sample, torch.tensor(999.0), context)
    ops = ov_bf16.last_compiled("unet").get_runtime_model().get_ops()
    runtime = {op.get_friendly_name(): op.get_rt_info() for op in ops}
    kinds = {(info["layerType"].astype(str), info["runtimePrecision"].astype(str)) for info in runtime.values()}
    assert ("Convolution", "bf16") in kinds  # bf16 is really on
    precisions = ov_bf16.sag_layer_precisions()
    assert precisions["attn_score"] == "f32" and len(precisions) == 2, precisions  # the softmax and the output
    assert set(precisions.values()) == {"f32"}
    phases = [info["runtimePrecision"].astype(str) for name, info in runtime.items() if "timestep_phase" in name]
    assert phases == ["f32"]
    with torch.no_grad():
        noise_ref, score_ref = TorchRunners(tiny).unet(sample, 999.0, context)
    assert score.dtype == torch.float32 and noise_pred.dtype == torch.float32
    assert relative_error(score, score_ref) < 1e-2 and relative_error(noise_pred, noise_ref) < 1e-1


@needs_bf16
def test_bf16_images_are_as_close_to_fp32_as_eager_bf16(ov_export, ov_bf16):
    """docs/design.md: sagrt bf16 images at least as close to the fp32 reference as diffusers' own eager bf16 run (its
    modules in torch bf16), mean PSNR over fixed seeds, ddim and euler-a, tiny."""
    seeds = range(4)
    for scheduler in ("ddim", "euler-a"):
        psnrs = {}
        runs = {"reference": pipeline("torch", scheduler=scheduler),
                "eager bf16": pipeline("torch", scheduler=scheduler, torch_dtype=torch.bfloat16),
                "openvino bf16": pipeline("openvino", ov_export, scheduler, precision="bf16")}
        images = {name: [torch.as_tensor(pipe("a photo of a cat", negative_prompt="blurry", height=64, width=64,
                                                   num_inference_steps=20, generator=torch.Generator().manual_seed(s),
                                                   output_type="np").images) for s in seeds]
                  for name, pipe in runs.items()}
        for name in ("eager bf16", "openvino bf16"):
            psnrs[name] = sum(psnr_db(a, b) for a, b in zip(images[name], images["reference"])) / len(seeds)
        assert 35 < psnrs["eager bf16"] <= psnrs["openvino bf16"] < 90, (scheduler, psnrs)


# ---- static shapes and the compiled cache ------------------------------------------------------------
def unet_call(runners, batch, seed=6):
    gen = torch.Generator().manual_seed(seed)
    sample, context = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 77, 32, generator=gen)
    return runners.unet(sample, torch.tensor(10.0), context)


def test_each_shape_is_compiled_once_cached_and_reused(ov_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(ov_export, folder, ignore=shutil.ignore_patterns("openvino-*"))
    first = OvRunners(folder, "fp32", threads=1, shapes_kept=1)
    one, two = unet_call(first, 1), unet_call(first, 2)
    assert list(first.loaded["unet"]) == ["unet-2x4x8x8-1-2x77x32"]  # shapes_kept=1: batch 1 left memory
    assert torch.equal(unet_call(first, 1)[0], one[0]) and first.imported == ["unet-1x4x8x8-1-1x77x32"]
    lines = capsys.readouterr().err.splitlines()
    compiled = [line.split()[2] for line in lines if line.startswith("openvino: compiled")]
    assert compiled == ["unet-1x4x8x8-1-1x77x32", "unet-2x4x8x8-1-2x77x32"]  # the import printed nothing
    manifest = artifacts.read_manifest(first.cache.folder)
    assert manifest["precision"] == "fp32" and sorted(manifest["files"]) == [
        "unet-1x4x8x8-1-1x77x32.blob", "unet-2x4x8x8-1-2x77x32.blob"]
    assert manifest["sources"]["unet.onnx"] == artifacts.read_manifest(folder)["files"]["unet.onnx"]["sha256"]
    again = OvRunners(folder, "fp32", threads=1)
    for batch, expected in ((2, two), (1, one)):
        for a, b in zip(unet_call(again, batch), expected):
            assert torch.equal(a, b)
    assert again.imported == ["unet-2x4x8x8-1-2x77x32", "unet-1x4x8x8-1-1x77x32"]
    fresh = OvRunners(folder, "fp32", threads=1, cache=False)
    unet_call(fresh, 1)
    assert fresh.imported == []


def test_dynamic_shapes_compile_once_for_every_shape(ov_export, ov_fp32):
    dynamic = OvRunners(ov_export, "fp32", threads=1, static_shapes=False, cache=False)
    for batch in (1, 2):
        for a, b in zip(unet_call(dynamic, batch), unet_call(ov_fp32, batch)):
            assert relative_error(a, b) <= CALL_BOUND
    assert list(dynamic.loaded["unet"]) == ["unet"]
    pipe = SAGPipeline.from_pretrained("tiny", backend="openvino", export_dir=ov_export, static_shapes=False)
    assert pipe.runners.static_shapes is False
    with pytest.raises(OpenVinoError, match="shapes_kept must be at least 1"):
        OvRunners(ov_export, "fp32", shapes_kept=0)


def test_dynamic_shapes_flag(ov_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(ov_export, folder, ignore=shutil.ignore_patterns("openvino-*"))
    assert generate(folder, tmp_path, "--dynamic-shapes") == 0
    blobs = sorted(p.name for p in next(folder.glob("openvino-*-fp32")).glob("*.blob"))
    assert blobs == ["text_encoder.blob", "unet.blob", "vae_decoder.blob"]  # one dynamic compilation each
    capsys.readouterr()
    assert main(["generate", "a cat", "--model", "tiny", "--backend", "onnxruntime", "--dynamic-shapes"]) == 2
    assert "backend onnxruntime takes no option --dynamic-shapes" in one_line_error(capsys)


def test_a_cache_for_other_export_files_is_replaced(ov_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(ov_export, folder, ignore=shutil.ignore_patterns("openvino-*"))
    runners = OvRunners(folder, "fp32", threads=1)
    unet_call(runners, 1)
    cache = runners.cache.folder
    manifest = artifacts.read_manifest(cache)
    manifest["sources"]["unet.onnx"] = "0" * 64  # as if compiled from another export
    artifacts.write_manifest(cache, manifest)
    again = OvRunners(folder, "fp32", threads=1)
    unet_call(again, 2)
    assert again.imported == [] and sorted(p.name for p in cache.glob("*.blob")) == ["unet-2x4x8x8-1-2x77x32.blob"]
    assert sorted(artifacts.read_manifest(cache)["files"]) == ["unet-2x4x8x8-1-2x77x32.blob"]


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------
def generate(folder, tmp_path, *extra):
    return main(["generate", "a cat", "--model", "tiny", "--backend", "openvino", "--export-dir", str(folder), "--steps", "1",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "images"), *extra])


def test_generate_runs_on_openvino(ov_export, tmp_path, capsys):
    extra = ["--precision", "bf16"] if HAS_BF16 else []
    assert generate(ov_export, tmp_path, *extra) == 0
    assert "backend openvino" in capsys.readouterr().out and (tmp_path / "images" / "sagrt-0-0.png").is_file()


@pytest.fixture(scope="module")
def generated_export(ov_export, tmp_path_factory):
    """A copy of the tiny export whose fp32 cache holds every compilation `generate` needs."""
    folder = tmp_path_factory.mktemp("tiny-openvino-generated") / "export"
    shutil.copytree(ov_export, folder, ignore=shutil.ignore_patterns("openvino-*"))
    assert generate(folder, folder.parent) == 0
    return folder


def cached_blob(folder, network) -> "Path":
    (blob,) = next(folder.glob("openvino-*-fp32")).glob(f"{network}-*.blob")
    return blob


def test_corrupt_compiled_cache_is_one_line_exit_2(generated_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(generated_export, folder)
    blob = cached_blob(folder, "vae_decoder")  # the last network called: the cache is checked before any call
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert generate(folder, tmp_path) == 2
    err = one_line_error(capsys)
    assert f"{blob.name} is corrupted" in err and f"delete {blob.parent}" in err
    assert not (tmp_path / "images").exists()


def test_cache_this_openvino_cannot_import_is_one_line_exit_2(generated_export, tmp_path, capsys):
    """A blob whose hash matches its manifest but that OpenVINO refuses (as one from another build would be)."""
    folder = tmp_path / "export"
    shutil.copytree(generated_export, folder)
    blob = cached_blob(folder, "vae_decoder")
    blob.write_bytes(b"not a compiled network " * 100)
    manifest = artifacts.read_manifest(blob.parent)
    manifest["files"][blob.name] = {"sha256": artifacts.sha256_file(blob), "bytes": blob.stat().st_size}
    artifacts.write_manifest(blob.parent, manifest)
    assert generate(folder, tmp_path) == 2
    # found when the decoder is first needed, after the denoising loop (its progress bar is on stderr too)
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert f"cannot import the compiled cache {blob.name} ([CPU] Cannot import compiled blob" in err
    assert f"delete {blob.parent}" in err and not (tmp_path / "images").exists()


def test_graph_openvino_cannot_read_is_one_line_exit_2(ov_export, tmp_path, capsys):
    """A graph with an operator this OpenVINO does not know (as a graph from a newer exporter would be)."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "export"
    shutil.copytree(ov_export, folder, ignore=shutil.ignore_patterns("openvino-*"))
    node = helper.make_node("SagrtFutureOp", ["input_ids"], ["hidden"], domain="ai.sagrt.future")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, 77])],
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 77, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("ai.sagrt.future", 1)]),
              str(folder / "text_encoder.onnx"))
    manifest = artifacts.read_manifest(folder)  # a consistent export: the hash check passes, OpenVINO's reader not
    manifest["files"]["text_encoder.onnx"] = {"sha256": artifacts.sha256_file(folder / "text_encoder.onnx"),
                                              "bytes": (folder / "text_encoder.onnx").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert generate(folder, tmp_path) == 2
    err = one_line_error(capsys)
    assert "cannot read text_encoder.onnx (No conversion rule found for operations: " in err
    assert "ai.sagrt.future.SagrtFutureOp" in err and "pip install -U openvino" in err
    assert not (tmp_path / "images").exists() and not list(folder.glob("openvino-*"))


def test_bf16_needs_a_cpu_with_bfloat16():
    check_precision("bf16", ["FP32", "BF16", "INT8"])
    check_precision("fp32", ["FP32"])
    with pytest.raises(OpenVinoError, match=r"this CPU has no bfloat16 support .*FP32, INT8.*--precision fp32"):
        check_precision("bf16", ["FP32", "INT8"])
    with pytest.raises(OpenVinoError, match="unknown precision 'fp16'"):
        check_precision("fp16", ["FP32", "FP16"])


def test_bad_backend_options_are_refused(capsys):
    with pytest.raises(BackendError, match="backend openvino runs in fp32 or bf16, not 'int8'"):
        SAGPipeline.from_pretrained("tiny", backend="openvino", precision="int8")
    with pytest.raises(BackendError, match="backend openvino takes no option providers"):
        SAGPipeline.from_pretrained("tiny", backend="openvino", providers="cpu")
    with pytest.raises(BackendError, match="runs in fp32 or bf16, not 'fp16'"):
        SAGPipeline.from_pretrained("tiny", backend="openvino", torch_dtype=torch.float16)
    assert main(["generate", "--model", "tiny", "--backend", "openvino", "--precision", "fp16"]) == 2
    assert "backend openvino runs in fp32 or bf16, not 'fp16'" in one_line_error(capsys)
    assert main(["generate", "--model", "tiny", "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    assert "backend onnxruntime runs in fp32 or fp16, not 'bf16'" in one_line_error(capsys)


def test_backend_specs_and_auto():
    assert parse_backend_spec("openvino:bf16") == ("openvino", "bf16")
    assert parse_backend_spec(" openvino ") == ("openvino", None)
    assert parse_backend_spec("onnxruntime:fp16") == ("onnxruntime", "fp16")
    with pytest.raises(BenchError, match="onnxruntime runs in fp32 or fp16"):
        parse_backend_spec("onnxruntime:bf16")
    with pytest.raises(BenchError, match="openvino runs in fp32 or bf16"):
        parse_backend_spec("openvino:fp8")
    assert resolve_backend("auto").name != "openvino"  # auto never picks openvino, nor a lower precision


# ---- sagrt parity ---------------------------------------------------------------------------------
def test_parity_command_openvino_fp32_passes(ov_export, capsys):
    code = main(["parity", "--model", "tiny", "--export-dir", str(ov_export), "--backends", "openvino,torch",
                 "--steps", "3", "--height", "64", "--width", "64", "--scheduler", "euler-a"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert code == 0 and len(rows) == 3 and out.strip().endswith(": ok")
    assert all(float(row[2]) <= 1e-4 and float(row[4]) <= 1e-3 for row in rows)


@needs_bf16
def test_parity_command_holds_bf16_to_eager_bf16(ov_export, capsys):
    code = main(["parity", "--model", "tiny", "--export-dir", str(ov_export), "--backends", "openvino,torch",
                 "--precision", "bf16", "--steps", "8", "--height", "64", "--width", "64", "--num-images", "1",
                 "--psnr-seeds", "0,1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 8 and out.startswith("openvino (bf16) against torch")
    eager = re.search(r"eager bf16 against torch: .* (\d+) mask position\(s\) differ; image PSNR ([\d.]+) dB", out)
    ours = re.search(r"openvino \(bf16\): .* image PSNR ([\d.]+) dB \(bound: at least eager bf16's ([\d.]+) dB\): "
                     r"(ok|FAIL)", out)
    assert eager and ours and ours.group(2) == eager.group(2), out
    passed = float(ours.group(1)) >= float(eager.group(2))
    assert (code, ours.group(3)) == ((0, "ok") if passed else (1, "FAIL"))
