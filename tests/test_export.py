"""ONNX export of the tiny model: graph checks, declared I/O, per-module ONNX Runtime (CPU) parity against
torch, external data, manifest reuse and the TensorRT parser check."""

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import relative_error
from sagrt.export import artifacts, specs
from sagrt.export.onnx_export import (FUSED_UNET, ExportError, export_model, network_specs, split_geglu,
                                      verify_export)
from sagrt.export.trt_compat import tensorrt_findings
from sagrt.runtime.torch_runners import TorchRunners

BOUND = 1e-5
NETWORKS = ("unet", "text_encoder", "vae_decoder")
UNET_GRAPHS = ("unet", FUSED_UNET)  # the portable graph (TensorRT) and the fused-attention one (ONNX Runtime)
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int32": onnx.TensorProto.INT32}
LATENT_SIZES = [(8, 8), (8, 12), (7, 9)]  # square, non-square, odd


def session(folder, network):
    return ort.InferenceSession(str(folder / f"{network}.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_runners(tiny):
    return TorchRunners(tiny)


@pytest.mark.parametrize("network", NETWORKS)
def test_graph_passes_checker_and_strict_shape_inference(tiny_onnx, network):
    model = onnx.load(str(tiny_onnx / f"{network}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert len(inferred.graph.value_info) > 0


def test_fused_graph_passes_checker_and_has_one_fused_attention_per_layer(tiny, tiny_onnx):
    model = onnx.load(str(tiny_onnx / f"{FUSED_UNET}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    attention_layers = len(tiny.unet.attn_processors)  # every one is plain; the SAG layer keeps explicit softmax
    assert ops.count("MultiHeadAttention") == attention_layers - 1 and ops.count("Softmax") == 1
    portable = [node.op_type for node in onnx.load(str(tiny_onnx / "unet.onnx")).graph.node]
    assert "MultiHeadAttention" not in portable and portable.count("Softmax") == attention_layers
    inferred = onnx.shape_inference.infer_shapes(model)  # com.microsoft ops have no ONNX schema: not strict
    assert len(inferred.graph.value_info) > 0
    # the fused graph is ONNX Runtime's: the TensorRT parser check names its fused attention nodes, nothing else
    findings = tensorrt_findings(tiny_onnx / f"{FUSED_UNET}.onnx")
    assert len(findings) == attention_layers - 1 and {f.op for f in findings} == {"MultiHeadAttention"}


def test_split_geglu_keeps_the_values_and_is_scoped(tiny):
    """GEGLU as two linears gives the module's own output; outside the block (also after an exception) every
    GEGLU runs diffusers' forward again."""
    from diffusers.models.activations import GEGLU

    unet = tiny.unet
    modules = [module for module in unet.modules() if type(module) is GEGLU]
    assert modules
    gen = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        reference = unet(sample, 400, encoder_hidden_states=context).sample
        with split_geglu(unet):
            assert all("forward" in vars(module) for module in modules)
            split = unet(sample, 400, encoder_hidden_states=context).sample
    assert relative_error(split, reference) <= 1e-6
    with pytest.raises(RuntimeError, match="inside"), split_geglu(unet):
        raise RuntimeError("inside")
    assert not any("forward" in vars(module) for module in modules)


@pytest.mark.parametrize("graph", UNET_GRAPHS)
def test_geglu_projections_are_two_matmuls_without_slices(tiny, tiny_onnx, graph):
    from diffusers.models.activations import GEGLU

    nodes = [node for node in onnx.load(str(tiny_onnx / f"{graph}.onnx"), load_external_data=False).graph.node
             if "/ff/net.0/" in node.name]
    ops = [node.op_type for node in nodes]
    geglus = sum(type(module) is GEGLU for module in tiny.unet.modules())
    assert ops.count("MatMul") == 2 * geglus and "Slice" not in ops and "Split" not in ops


@pytest.mark.parametrize("network", NETWORKS + (FUSED_UNET,))
def test_declared_names_dtypes_and_dynamic_axes(tiny, tiny_onnx, network):
    spec = network_specs(tiny, "fp32")["unet" if network == FUSED_UNET else network]
    graph = onnx.load(str(tiny_onnx / f"{network}.onnx"), load_external_data=False).graph
    for declared, actual in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
        assert [t.name for t in declared] == [v.name for v in actual]
        for t, value in zip(declared, actual):
            assert value.type.tensor_type.elem_type == ONNX_DTYPES[t.dtype], t.name
            dims = value.type.tensor_type.shape.dim
            assert len(dims) == len(t.shape), t.name
            for want, dim in zip(t.shape, dims):
                if isinstance(want, str):
                    assert dim.dim_param == want and not dim.HasField("dim_value"), (t.name, want)
                else:
                    assert dim.dim_value == want, (t.name, want)


@pytest.mark.parametrize("graph", UNET_GRAPHS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", LATENT_SIZES)
def test_unet_parity(tiny_onnx, torch_runners, graph, batch, size):
    gen = torch.Generator().manual_seed(batch * 100 + size[1])
    sample = torch.randn(batch, 4, *size, generator=gen)
    context = torch.randn(batch, 77, 32, generator=gen)
    timestep = torch.tensor([637.0])
    with torch.no_grad():
        noise_ref, score_ref = torch_runners.unet(sample, timestep, context)
    noise, score = session(tiny_onnx, graph).run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                                        "encoder_hidden_states": context.numpy()})
    assert score.dtype == np.float32 and score.shape == tuple(score_ref.shape)
    assert score.shape[1:] == (specs.map_side(size[0], 1), specs.map_side(size[1], 1))
    assert relative_error(noise, noise_ref) <= BOUND
    assert relative_error(score, score_ref) <= BOUND
    # the score averages 1.0: its informative part is the deviation from 1, checked on its own
    assert score_ref.std() > 1e-3
    assert relative_error(score - 1, score_ref - 1) <= 1e-4


@pytest.mark.parametrize("batch", [1, 2])
def test_text_encoder_parity_every_layer(tiny, tiny_onnx, batch):
    input_ids = torch.randint(0, tiny.text_encoder.config.vocab_size, (batch, 77),
                              generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        out = tiny.text_encoder(input_ids, output_hidden_states=True)
        norm = tiny.text_encoder.final_layer_norm
        layers_ref = torch.stack([norm(h) for h in out.hidden_states])
    hidden, layers = session(tiny_onnx, "text_encoder").run(None, {"input_ids": input_ids.int().numpy()})
    assert relative_error(hidden, out.last_hidden_state) <= BOUND
    assert layers.shape == (tiny.text_encoder.config.num_hidden_layers + 1, batch, 77, 32)
    for i in range(layers.shape[0]):
        assert relative_error(layers[i], layers_ref[i]) <= BOUND


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", LATENT_SIZES)
def test_vae_decoder_parity(tiny_onnx, torch_runners, batch, size):
    latent = torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(batch + size[0]))
    with torch.no_grad():
        image_ref = torch_runners.decode(latent)
    (image,) = session(tiny_onnx, "vae_decoder").run(None, {"latent": latent.numpy()})
    assert image.shape == (batch, 3, size[0] * 8, size[1] * 8)
    assert relative_error(image, image_ref) <= BOUND


def test_manifest_records_request_files_and_io(tiny, tiny_onnx):
    from sagrt import __version__

    manifest = verify_export(tiny_onnx)
    assert manifest["kind"] == "onnx" and manifest["sagrt_version"] == __version__
    assert manifest["model_fingerprint"] == tiny.fingerprint and manifest["model_source"] == "tiny"
    assert (manifest["opset"], manifest["precision"]) == (17, "fp32")
    assert manifest["model_info"]["text_layers"] == 2 and manifest["sag_map_downsamplings"] == 1
    assert manifest["fused_attention_unet"] == "unet_fused.onnx" and FUSED_UNET not in manifest["networks"]
    for name in ("unet.onnx", "unet_fused.onnx", "text_encoder.onnx", "vae_decoder.onnx",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        entry = manifest["files"][name]
        assert entry["bytes"] == (tiny_onnx / name).stat().st_size
        assert entry["sha256"] == artifacts.sha256_file(tiny_onnx / name)
    assert manifest["networks"]["unet"]["outputs"] == [["noise_pred", "float32", ["B", 4, "H", "W"]],
                                                       ["attn_score", "float32", ["B", "HM", "WM"]]]


def test_matching_export_is_reused_and_force_redoes_it(tiny, tiny_onnx, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    before = (folder / "unet.onnx").stat().st_ino, artifacts.read_manifest(folder)["created"]
    assert export_model(tiny, folder, progress=False) == folder
    assert ((folder / "unet.onnx").stat().st_ino, artifacts.read_manifest(folder)["created"]) == before
    export_model(tiny, folder, force=True, progress=False)
    assert (folder / "unet.onnx").stat().st_ino != before[0]
    verify_export(folder)
    # no staging or temporary files left; the hash record is all
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [artifacts.HASH_RECORD]


def test_verification_reads_again_only_the_files_that_changed(tiny_onnx, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)  # new inodes: the copy's files are all hashed once
    for file in folder.rglob("*"):  # written an hour ago: a hash taken just after a write is not trusted
        os.utime(file, ns=(file.stat().st_mtime_ns - 3600 * 10**9,) * 2)
    verify_export(folder)
    hashed, real_sha256 = [], artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(path.name) or real_sha256(path))
    verify_export(folder)
    assert hashed == []
    data = bytearray((folder / "unet_fused.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "unet_fused.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="unet_fused.onnx .* is corrupted"):
        verify_export(folder)
    assert hashed == ["unet_fused.onnx"]


def test_mismatched_request_is_refused_with_the_command(tiny, tiny_onnx):
    with pytest.raises(ExportError, match=r"opset: found 17, wanted 18.*sagrt export --model tiny .* --force"):
        export_model(tiny, tiny_onnx, opset=18, progress=False)


def test_fused_attention_processor_matches_the_layers_own_and_is_scoped(tiny):
    from sagrt.export.attention import fused_attention, is_plain_attention

    gen = torch.Generator().manual_seed(11)
    sample, context = torch.randn(2, 4, 7, 9, generator=gen), torch.randn(2, 77, 32, generator=gen)
    before = {name: type(p) for name, p in tiny.unet.attn_processors.items()}
    with torch.no_grad():
        reference = tiny.unet(sample, 300, encoder_hidden_states=context).sample
        with fused_attention(tiny.unet):
            assert {type(p).__name__ for p in tiny.unet.attn_processors.values()} == {"FusedAttentionProcessor"}
            fused = tiny.unet(sample, 300, encoder_hidden_states=context).sample
        with pytest.raises(KeyError), fused_attention(tiny.unet):
            raise KeyError("inside")
    assert relative_error(fused, reference) <= BOUND
    assert {name: type(p) for name, p in tiny.unet.attn_processors.items()} == before
    # the VAE's attention has a group norm and a residual: it is not plain and would keep its processor
    assert not is_plain_attention(tiny.vae.decoder.mid_block.attentions[0])


def test_default_folder_comes_from_the_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SAGRT_CACHE", str(tmp_path))
    assert artifacts.artifact_dir(tiny.fingerprint, "onnx", "k") == tmp_path / tiny.fingerprint / "onnx" / "k"


def test_external_data_forced(tiny, torch_runners, tmp_path):
    folder = export_model(tiny, tmp_path / "ext", external_data=True, progress=False)
    manifest = verify_export(folder)
    for network in NETWORKS:
        data = folder / f"{network}.onnx.data"
        assert f"{network}.onnx.data" in manifest["files"] and data.stat().st_size > 10_000
        assert data.stat().st_mode & 0o777 == (folder / f"{network}.onnx").stat().st_mode & 0o777  # not 0600
        assert (folder / f"{network}.onnx").stat().st_size < data.stat().st_size
        onnx.checker.check_model(str(folder / f"{network}.onnx"))
    # the fused graph stores no second copy of the UNet weights: it points into unet.onnx.data
    fused = onnx.load(str(folder / f"{FUSED_UNET}.onnx"), load_external_data=False)
    locations = {entry.value for tensor in fused.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    assert locations == {"unet.onnx.data"} and not (folder / f"{FUSED_UNET}.onnx.data").exists()
    onnx.checker.check_model(str(folder / f"{FUSED_UNET}.onnx"))
    gen = torch.Generator().manual_seed(5)
    sample, context = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(2, 77, 32, generator=gen)
    timestep = torch.tensor([400.0])
    with torch.no_grad():
        noise_ref, score_ref = torch_runners.unet(sample, timestep, context)
    for graph in UNET_GRAPHS:
        noise, score = session(folder, graph).run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                                         "encoder_hidden_states": context.numpy()})
        assert relative_error(noise, noise_ref) <= BOUND and relative_error(score, score_ref) <= BOUND
    export_model(tiny, folder, force=True, external_data=False, progress=False)
    assert not list(folder.glob("*.data")) and verify_export(folder)


def test_default_export_stores_the_unet_weights_once(tiny_onnx):
    """Whatever its size, the UNet goes to one external weights file that both UNet graphs point into; the
    small networks stay in one file each."""
    manifest = verify_export(tiny_onnx)
    assert sorted(name for name in manifest["files"] if name.endswith(".data")) == ["unet.onnx.data"]
    assert [path.name for path in tiny_onnx.glob("*.data")] == ["unet.onnx.data"]
    for graph in UNET_GRAPHS:
        model = onnx.load(str(tiny_onnx / f"{graph}.onnx"), load_external_data=False)
        locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        assert locations == {"unet.onnx.data"}
    data_bytes = (tiny_onnx / "unet.onnx.data").stat().st_size
    assert (tiny_onnx / f"{FUSED_UNET}.onnx").stat().st_size < data_bytes / 10


def test_fp16_export_keeps_the_score_float32(tiny, tmp_path):
    folder = export_model(tiny, tmp_path / "fp16", precision="fp16", progress=False)
    graph = onnx.load(str(folder / "unet.onnx")).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    assert dtypes == {"sample": onnx.TensorProto.FLOAT16, "timestep": onnx.TensorProto.FLOAT,
                      "encoder_hidden_states": onnx.TensorProto.FLOAT16, "noise_pred": onnx.TensorProto.FLOAT16,
                      "attn_score": onnx.TensorProto.FLOAT}
    assert next(tiny.unet.parameters()).dtype == torch.float32  # the caller's modules are left in fp32
    gen = torch.Generator().manual_seed(9)
    sample, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        noise_ref, score_ref = TorchRunners(tiny).unet(sample, torch.tensor([500.0]), context)
    for graph in UNET_GRAPHS:
        noise, score = session(folder, graph).run(None, {"sample": sample.half().numpy(),
                                                         "timestep": np.array([500.0], np.float32),
                                                         "encoder_hidden_states": context.half().numpy()})
        assert score.dtype == np.float32
        assert relative_error(noise, noise_ref) <= 1e-2 and relative_error(score, score_ref) <= 1e-3


@pytest.mark.parametrize("network", NETWORKS)
def test_exported_graphs_pass_the_tensorrt_parser_check(tiny_onnx, network):
    assert tensorrt_findings(tiny_onnx / f"{network}.onnx") == []


def test_tensorrt_check_reports_unsupported_ops_and_attributes():
    h = onnx.helper
    nodes = [
        h.make_node("Det", ["x"], ["d"], name="det"),
        h.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="cubic"),
        h.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[2, 2], dilations=[2, 2]),
        h.make_node("FusedGemm", ["x", "x"], ["f"], name="fused", domain="com.microsoft"),
        h.make_node("Relu", ["x"], ["ok"], name="relu"),
    ]
    graph = h.make_graph(nodes, "bad", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                         [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in "drpf"] +
                         [h.make_tensor_value_info("ok", onnx.TensorProto.FLOAT, None)],
                         initializer=[h.make_tensor("scales", onnx.TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 22), h.make_opsetid("com.microsoft", 1)])
    findings = {(f.node, f.op): f.reason for f in tensorrt_findings(model)}
    assert set(findings) == {("(model)", "opset"), ("det", "Det"), ("resize", "Resize"), ("pool", "MaxPool"),
                             ("fused", "FusedGemm")}
    assert "mode='cubic'" in findings[("resize", "Resize")]
    assert "dilations" in findings[("pool", "MaxPool")] and "com.microsoft" in findings[("fused", "FusedGemm")]


def test_other_sag_layer_is_exported_and_matches(tiny, tmp_path):
    from sagrt.engine.onnxruntime_runner import OrtRunners

    layer = "up_blocks.0.attentions.1.transformer_blocks.0.attn1"
    folder = export_model(tiny, tmp_path / "layer", sag_layer=layer, progress=False)
    runners = OrtRunners(folder, ["cpu"])
    assert runners.manifest["sag_layer"] == layer and runners.info.sag_layer == layer
    gen = torch.Generator().manual_seed(8)
    sample, context = torch.randn(2, 4, 7, 10, generator=gen), torch.randn(2, 77, 32, generator=gen)
    noise, score = runners.unet(sample, torch.tensor(250), context)
    with torch.no_grad():
        noise_ref, score_ref = TorchRunners(tiny, sag_layer=layer).unet(sample, torch.tensor(250), context)
    assert score.shape == score_ref.shape == (2, 4, 5)
    assert relative_error(noise, noise_ref) <= BOUND and relative_error(score, score_ref) <= BOUND


def test_export_command_refuses_a_layer_that_is_not_self_attention(tmp_path, capsys):
    from sagrt.runtime.cli import main

    assert main(["export", "--model", "tiny", "--out", str(tmp_path / "x"), "--sag-layer", "mid_block.attn2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a self-attention layer" in err
