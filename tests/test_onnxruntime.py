"""The onnxruntime backend: runners, providers, the whole SAG loop against torch, the parity command and the
one-line errors for damaged or foreign exports."""

import json
import shutil
import re

import pytest
import torch

from conftest import relative_error
from sagrt.engine.onnxruntime_runner import OrtInputError, OrtRunners, ProviderError, resolve_providers, unet_graph
from sagrt.export import artifacts
from sagrt.export.onnx_export import ExportError
from sagrt.runtime import SAGPipeline
from sagrt.runtime.cli import main
from sagrt.runners import ModelInfo
from sagrt.runtime.torch_runners import TorchRunners

# final latents after the whole loop, onnxruntime fp32 vs torch fp32 on CPU: docs/design.md's 1e-3 (the parity
# command's default) is for any machine and provider; here the same CPU kernels agree closely, so a drift shows at 1e-5
LOOP_BOUND = 1e-5
ALL_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def ort_runners(tiny_onnx):
    return OrtRunners(tiny_onnx, ["cpu"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- runners ------------------------------------------------------------------------------------
def test_io_binding_path_matches_the_plain_path(tiny_onnx, ort_runners):
    bound = OrtRunners(tiny_onnx, ["cpu"], io_binding=True)
    gen = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 4, 7, 9, generator=gen), torch.randn(2, 77, 32, generator=gen)
    input_ids = torch.randint(0, 591, (2, 77), generator=gen)
    timestep = torch.tensor(500)
    for a, b in zip(bound.unet(sample, timestep, context), ort_runners.unet(sample, timestep, context)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert torch.allclose(bound.encode_text(input_ids, clip_skip=1), ort_runners.encode_text(input_ids, clip_skip=1))
    image = bound.decode(sample)
    assert image.shape == (2, 3, 56, 72) and torch.allclose(image, ort_runners.decode(sample), atol=1e-6)


def test_fused_attention_graph_runs_except_under_tensorrt(tiny_onnx, ort_runners):
    manifest = ort_runners.manifest
    assert ort_runners.files["unet"] == "unet_fused.onnx"
    assert OrtRunners(tiny_onnx, ["cpu"], fused_attention=False).files["unet"] == "unet.onnx"
    assert unet_graph(manifest, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "unet_fused.onnx"
    assert unet_graph(manifest, ALL_GPU) == "unet.onnx"  # TensorRT's parser does not know com.microsoft ops
    # CPU sessions spin between the nodes of a run and stop spinning when it ends
    options = ort_runners.sessions["unet"].get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.parametrize("fused_attention", [True, False])
def test_runner_calls_match_torch(tiny, tiny_onnx, fused_attention):
    ort_runners = OrtRunners(tiny_onnx, ["cpu"], fused_attention=fused_attention)
    reference = TorchRunners(tiny)
    gen = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 591, (2, 77), generator=gen)
    with torch.no_grad():
        for clip_skip in (None, 0, 1):
            assert relative_error(ort_runners.encode_text(input_ids, clip_skip),
                                  reference.encode_text(input_ids, clip_skip)) <= 1e-5
        sample, context = torch.randn(1, 4, 9, 7, generator=gen), torch.randn(1, 77, 32, generator=gen)
        for a, b in zip(ort_runners.unet(sample, torch.tensor(999), context), reference.unet(sample, 999, context)):
            assert a.shape == b.shape and relative_error(a, b) <= 1e-5
    assert ort_runners.info == ModelInfo.of(tiny)


def test_compiled_graphs_refuse_what_they_cannot_take(ort_runners):
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(OrtInputError, match="cross_attention_kwargs"):
        ort_runners.unet(sample, torch.tensor(1), context, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(OrtInputError, match="clip_skip 3"):
        ort_runners.encode_text(torch.zeros(1, 77, dtype=torch.long), clip_skip=3)


def test_provider_resolution():
    assert resolve_providers(None, ALL_GPU) == ALL_GPU
    assert resolve_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("cuda,cpu", ALL_GPU) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["TensorrtExecutionProvider"], ALL_GPU) == ["TensorrtExecutionProvider"]
    with pytest.raises(ProviderError, match="unknown execution provider 'rocket'"):
        resolve_providers("rocket", ALL_GPU)
    with pytest.raises(ProviderError, match="'cuda' .* is not installed here.*onnxruntime-gpu"):
        resolve_providers("cuda", ["CPUExecutionProvider"])


def test_auto_backend_picks_onnxruntime_without_tensorrt():
    from sagrt.engine.tensorrt_build import tensorrt_missing
    from sagrt.runtime.backends import resolve_backend

    expected = "onnxruntime" if tensorrt_missing() else "tensorrt"
    assert resolve_backend("auto").name == expected and resolve_backend("torch").name == "torch"


@pytest.mark.gpu
def test_cuda_provider_keeps_tensors_on_the_device(tiny, tiny_onnx):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime-gpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA execution provider (install onnxruntime-gpu)")
    runners = OrtRunners(tiny_onnx, ["cuda"])
    assert runners.io_binding and runners.device.type == "cuda"
    sample, context = torch.randn(2, 4, 8, 12, device="cuda"), torch.randn(2, 77, 32, device="cuda")
    noise, score = runners.unet(sample, torch.tensor(500), context)
    assert noise.device.type == "cuda" and score.device.type == "cuda"
    with torch.no_grad():
        noise_ref, score_ref = TorchRunners(tiny).unet(sample.cpu(), 500, context.cpu())
    assert relative_error(noise.cpu(), noise_ref) <= 1e-4 and relative_error(score.cpu(), score_ref) <= 1e-4


# ---- the whole loop -----------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_whole_loop_matches_torch(tiny, tiny_onnx, scheduler, guidance):
    results = {}
    for name in ("torch", "onnxruntime"):
        options = {"export_dir": tiny_onnx, "providers": "cpu"} if name == "onnxruntime" else {}
        pipe = SAGPipeline.from_pretrained("tiny", backend=name, scheduler=scheduler, **options)
        pipe.set_progress_bar_config(disable=True)
        results[name] = pipe(["a photo of a cat", "a red car"], negative_prompt=["blurry", "dark"], height=64,
                             width=96, num_inference_steps=5, guidance_scale=guidance, sag_scale=0.75,
                             generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert results["torch"].shape == (2, 4, 8, 12)
    assert relative_error(results["onnxruntime"], results["torch"]) <= LOOP_BOUND


def test_loop_runs_torch_at_one_thread_between_cpu_engine_calls(tiny_onnx):
    """torch's OpenMP workers spin after a parallel op and take the cores from the engine's next call
    (benchmarks/RESULTS-openvino.md): the loop holds torch at one thread on CPU engines, and restores it."""
    seen = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, options in (("onnxruntime", {"export_dir": tiny_onnx, "providers": "cpu"}), ("torch", {})):
            pipe = SAGPipeline.from_pretrained("tiny", backend=name, **options)
            pipe.set_progress_bar_config(disable=True)
            pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="latent",
                 callback=lambda step, t, latents: seen.setdefault(name, torch.get_num_threads()))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == {"onnxruntime": 1, "torch": 2}


def test_backend_exports_on_first_use_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGRT_CACHE", str(tmp_path))
    first = SAGPipeline.from_pretrained("tiny", backend="onnxruntime")
    folder = first.runners.export_dir
    assert folder.is_relative_to(tmp_path) and (folder / "unet.onnx").is_file()
    inode = (folder / "unet.onnx").stat().st_ino
    second = SAGPipeline.from_pretrained("tiny", backend="onnxruntime")
    assert second.runners.name == "onnxruntime" and second.runners.export_dir == folder
    assert (folder / "unet.onnx").stat().st_ino == inode
    # an export an older sagrt left in the cache is redone; one in a folder the user named is refused
    manifest = artifacts.read_manifest(folder)
    artifacts.write_manifest(folder, {**manifest, "sagrt_version": "0.0.1"})
    with pytest.raises(ExportError, match="sagrt_version: found '0.0.1'.*--force"):
        SAGPipeline.from_pretrained("tiny", backend="onnxruntime", export_dir=folder)
    third = SAGPipeline.from_pretrained("tiny", backend="onnxruntime")
    assert third.runners.manifest["sagrt_version"] == manifest["sagrt_version"]
    assert (folder / "unet.onnx").stat().st_ino != inode


# ---- sagrt parity -------------------------------------------------------------------------------
def test_parity_command_prints_each_step_and_passes(tiny_onnx, capsys):
    code = main(["parity", "--model", "tiny", "--export-dir", str(tiny_onnx), "--backends", "onnxruntime,torch",
                 "--steps", "4", "--height", "64", "--width", "64", "--scheduler", "dpm++2m"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert code == 0 and len(rows) == 4
    for row in rows:
        assert float(row[2]) <= 1e-5 and float(row[4]) <= LOOP_BOUND  # noise_pred, latents
        differ, total = map(int, row[5].split("/"))
        assert total == 2 * 4 * 4 and differ == 0  # 2 images, 4x4 SAG map: no mask position flipped
    assert out.strip().endswith("SAG mask agreement 100.0000% (0 position(s) differ): ok")


def test_parity_counts_flipped_mask_positions():
    from sagrt.runtime.commands.parity import mask_differences

    score = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5  # CFG: (uncond, cond) x 2 images
    moved = score.clone()
    moved[0, 1, 2] = 2.0 - score[0, 1, 2]  # across the threshold 1.0, in the unconditional half
    moved[3, 0, 0] = 2.0 - score[3, 0, 0]  # in the conditional half, which the loop does not read
    assert mask_differences(moved, score, 1.0, cfg=True) == (1, 2 * 16)
    assert mask_differences(moved, score, 1.0, cfg=False) == (2, 4 * 16)


def test_parity_command_fails_past_its_bound(tiny_onnx, capsys):
    code = main(["parity", "--model", "tiny", "--export-dir", str(tiny_onnx), "--steps", "2", "--height", "64",
                 "--width", "64", "--latent-bound", "1e-12"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL: final latents error" in out


def test_parity_command_refuses_a_bad_backend_list(capsys):
    assert main(["parity", "--backends", "onnxruntime"]) == 2
    assert "--backends" in one_line_error(capsys)


# ---- damaged and foreign exports, providers: one line, exit 2 -----------------------------------
def generate(folder, tmp_path, *extra):
    return main(["generate", "--model", "tiny", "a cat", "--backend", "onnxruntime", "--export-dir", str(folder), "--steps", "1",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "images"), *extra])


def damaged_copy(tiny_onnx, tmp_path, damage):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    damage(folder)
    return folder


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(folder, **changes):
    manifest = artifacts.read_manifest(folder)
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


DAMAGES = {
    "missing": (lambda f: (f / "unet.onnx").unlink(), "unet.onnx is missing"),
    "truncated": (lambda f: (f / "vae_decoder.onnx").write_bytes((f / "vae_decoder.onnx").read_bytes()[:1000]),
                  "vae_decoder.onnx .* is truncated"),
    "corrupted": (lambda f: flip_one_byte(f / "text_encoder.onnx"), "text_encoder.onnx .* is corrupted"),
    "fused corrupted": (lambda f: flip_one_byte(f / "unet_fused.onnx"), "unet_fused.onnx .* is corrupted"),
    "other model": (lambda f: edit_manifest(f, model_fingerprint="preset-0000000000000000"),
                    "model_fingerprint: found 'preset-0000000000000000'"),
    "other version": (lambda f: edit_manifest(f, sagrt_version="0.0.1"), "sagrt_version: found '0.0.1'"),
}


def test_unreadable_manifest_is_no_export(tiny_onnx, tmp_path):
    """An unreadable manifest means an unfinished export: the backend exports again, `verify_export` refuses it."""
    from sagrt.export.onnx_export import ExportError, verify_export

    folder = damaged_copy(tiny_onnx, tmp_path, lambda f: (f / "manifest.json").write_text("{not json"))
    with pytest.raises(ExportError, match="holds no ONNX export.*sagrt export --model MODEL"):
        verify_export(folder)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_or_foreign_export_is_one_line_exit_2(tiny_onnx, tmp_path, capsys, damage):
    action, message = DAMAGES[damage]
    folder = damaged_copy(tiny_onnx, tmp_path, action)
    assert generate(folder, tmp_path) == 2
    err = one_line_error(capsys)
    assert err.startswith("sagrt generate: error: ")
    assert re.search(message, err), err
    assert "sagrt export --model tiny --out" in err and "--force" in err
    assert not (tmp_path / "images").exists()


def test_export_command_refuses_a_corrupted_export_until_forced(tiny_onnx, tmp_path, capsys):
    folder = damaged_copy(tiny_onnx, tmp_path, lambda f: flip_one_byte(f / "unet.onnx"))
    assert main(["export", "--model", "tiny", "--out", str(folder)]) == 2
    assert "unet.onnx" in one_line_error(capsys)
    assert main(["export", "--model", "tiny", "--out", str(folder), "--force"]) == 0
    out = capsys.readouterr().out
    assert f"exported tiny to {folder}/" in out
    assert ("parser check of text_encoder.onnx, unet.onnx, vae_decoder.onnx (unet_fused.onnx is ONNX Runtime's): "
            "every operator and attribute is supported") in out
    assert main(["export", "--model", "tiny", "--out", str(folder)]) == 0
    assert "reused the matching export" in capsys.readouterr().out


@pytest.mark.parametrize("provider, message", [("rocket", "unknown execution provider 'rocket'"),
                                               ("cuda", "is not installed here")])
def test_unavailable_provider_is_one_line_exit_2(tiny_onnx, tmp_path, capsys, provider, message):
    import onnxruntime

    if provider == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the provider is available")
    assert generate(tiny_onnx, tmp_path, "--provider", provider) == 2
    assert message in one_line_error(capsys)


def test_generate_runs_on_onnxruntime(tiny_onnx, tmp_path, capsys):
    assert generate(tiny_onnx, tmp_path) == 0
    out = capsys.readouterr().out
    assert "backend onnxruntime" in out and (tmp_path / "images" / "sagrt-0-0.png").is_file()


def test_export_of_another_precision_names_the_command_that_makes_it(tiny_onnx):
    from sagrt.export.onnx_export import ExportError

    with pytest.raises(ExportError, match=r"precision: found 'fp32', wanted 'fp16'.*--model tiny .*--precision fp16 "
                                          r"--force"):
        SAGPipeline.from_pretrained("tiny", backend="onnxruntime", export_dir=tiny_onnx, torch_dtype=torch.float16)


def test_unknown_backend_option_is_refused():
    from sagrt.runtime.backends import BackendError

    with pytest.raises(BackendError, match="backend onnxruntime takes no option bogus"):
        SAGPipeline.from_pretrained("tiny", backend="onnxruntime", bogus=1)
    with pytest.raises(BackendError, match="backend torch takes no option export_dir"):
        SAGPipeline.from_pretrained("tiny", backend="torch", export_dir="x")  # not silently dropped
    with pytest.raises(BackendError, match="backend onnxruntime runs in fp32 or fp16, not 'bf16'"):
        SAGPipeline.from_pretrained("tiny", backend="onnxruntime", precision="bf16")


def test_cli_names_the_flag_a_backend_does_not_take(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--backend", "torch", "--export-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "backend torch takes no option --export-dir" in capsys.readouterr().err


def test_an_export_for_another_sag_layer_is_refused(tiny_onnx):
    with pytest.raises(ExportError, match="sag_layer: found 'mid_block.*wanted 'up_blocks.1.*--sag-layer up_blocks"):
        SAGPipeline.from_pretrained("tiny", backend="onnxruntime", export_dir=tiny_onnx,
                                    sag_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn1")
