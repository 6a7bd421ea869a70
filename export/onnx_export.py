"""torch -> ONNX: the UNet with the SAG attention score as a second output, the text encoder with every
layer's normed hidden states (for clip_skip), and the VAE decoder; plus tokenizer/, scheduler/ and a
manifest, so the runtime can run from the export folder alone.

Files are exported into a staging folder inside the export folder, moved into place one by one, and the
manifest is written last: a folder without a manifest is an unfinished export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sagrt import __version__
from sagrt.errors import SagrtError
from sagrt.export import artifacts, specs
from sagrt.export.attention import capture_sag_score, fused_attention, resolve_layer
from sagrt.export.models import Components, final_layer_norm, load_model, model_fingerprint, save_scheduler
from sagrt.networks import DTYPE_NAMES, MID_BLOCK_LAYER, PRECISIONS
from sagrt.runners import ModelInfo

EXPORT_PRECISIONS = ("fp32", "fp16")  # weights and activations of an export; the SAG score stays float32
EXTERNAL_DATA_THRESHOLD = 2 << 30  # protobuf cannot hold a graph of 2 GB or more in one file
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention and the tracer's LayerNorm need 14 or later
# The UNet again with fused attention (com.microsoft MultiHeadAttention) for ONNX Runtime's CPU and CUDA
# providers; TensorRT builds from unet.onnx. Same inputs and outputs as "unet".
FUSED_UNET = "unet_fused"


class ExportError(SagrtError):
    """An export folder that cannot be used as asked: missing, foreign or damaged; the message says how to redo it."""


def _split_geglu_forward(self, hidden_states, *args, **kwargs):
    """diffusers' GEGLU with its projection as two linears (value, gate) instead of one linear and a chunk."""
    weight_value, weight_gate = self.proj.weight.chunk(2)
    bias_value, bias_gate = self.proj.bias.chunk(2) if self.proj.bias is not None else (None, None)
    return F.linear(hidden_states, weight_value, bias_value) * self.gelu(F.linear(hidden_states, weight_gate,
                                                                                  bias_gate))


@contextlib.contextmanager
def split_geglu(unet):
    """Every GEGLU of `unet` projects value and gate with two linears inside the block (restored after it, also
    after an exception). Same values; in the graph, two MatMuls and no Slice pair re-reading the projection's
    output, and ONNX Runtime fuses the gate's bias into its Gelu (faster: benchmarks/RESULTS-unet-cpu.md). Applied to both UNet graphs, so they keep sharing one weights file."""
    from diffusers.models.activations import GEGLU

    modules = [module for module in unet.modules() if type(module) is GEGLU]
    for module in modules:
        module.forward = types.MethodType(_split_geglu_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _float32(tensor):
    return None if tensor is None else tensor.float()


def _group_norm_fp32(self, x):
    return F.group_norm(x.float(), self.num_groups, _float32(self.weight), _float32(self.bias), self.eps).to(x.dtype)


def _layer_norm_fp32(self, x):
    return F.layer_norm(x.float(), self.normalized_shape, _float32(self.weight), _float32(self.bias),
                        self.eps).to(x.dtype)


@contextlib.contextmanager
def fp32_norms(module):
    """Inside the block, every GroupNorm and LayerNorm of `module` whose weights are not float32 normalises in
    float32 (input cast up, output cast back), as NVIDIA's SD demo gets from TensorRT's weak typing; restored
    after, also after an exception. In the graph: Cast, InstanceNormalization / LayerNormalization on float32,
    Cast. A float32 LayerNormalization also leaves TensorRT's ONNX parser, which sets the node's compute
    precision from stash_type (float32), nothing to override in a strongly typed network."""
    norms = {torch.nn.GroupNorm: _group_norm_fp32, torch.nn.LayerNorm: _layer_norm_fp32}
    patched = [m for m in module.modules() if type(m) in norms
               and any(p.dtype != torch.float32 for p in m.parameters(recurse=False))]
    for m in patched:
        m.forward = types.MethodType(norms[type(m)], m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class UNetWithScore(torch.nn.Module):
    """(sample, timestep [1] float32, encoder_hidden_states) -> (noise_pred, attn_score [B, HM, WM] float32).
    Normalisations and the SAG layer's softmax and score run in float32 also in an fp16 graph. `fused`: the attention layers other than the SAG layer run FusedAttention (the ONNX Runtime graph)."""

    def __init__(self, unet, sag_layer: str, fused: bool = False):
        super().__init__()
        self.unet, self.sag_layer, self.fused = unet, sag_layer, fused

    def forward(self, sample, timestep, encoder_hidden_states):
        with fused_attention(self.unet) if self.fused else contextlib.nullcontext(), split_geglu(self.unet), \
                fp32_norms(self.unet), capture_sag_score(self.unet, self.sag_layer) as capture:
            noise_pred = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return noise_pred, capture.score_map()


class TextEncoderWithLayers(torch.nn.Module):
    """input_ids [B, 77] int32 -> (hidden [B, 77, D], layer_hidden [L + 1, B, 77, D]), where layer_hidden[i] is
    final_layer_norm(hidden_states[i]): clip_skip k reads layer_hidden[-(k + 1)]. Runs in the text encoder's own
    dtype and casts its outputs to `out_dtype` (fp16 graphs keep CLIP in fp32: traced in fp16, transformers'
    CLIP mixes fp32 residuals into fp16 LayerNorms, which ONNX Runtime refuses; it costs two calls a run)."""

    def __init__(self, text_encoder, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.text_encoder, self.out_dtype = text_encoder, out_dtype

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.long(), output_hidden_states=True, return_dict=True)
        norm = final_layer_norm(self.text_encoder)
        layer_hidden = torch.stack([norm(h) for h in out.hidden_states])
        return out.last_hidden_state.to(self.out_dtype), layer_hidden.to(self.out_dtype)


class VaeDecoder(torch.nn.Module):
    """latent [B, 4, H, W] (already divided by the scaling factor) -> image [B, 3, 8H, 8W] in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        with fp32_norms(self.vae):
            return self.vae.decode(latent, return_dict=False)[0]


def sample_latent_size(components: Components) -> tuple[int, int]:
    """An odd latent size (not divisible by 2**(levels-1)): traced at a divisible size the UNet freezes
    forward_upsample_size and the graph fails at other sizes (docs/design.md, "Pitfalls")."""
    m = max(2, components.min_latent_side)
    return 2 * m + 1, 3 * m + 1


def network_specs(components: Components, precision: str) -> dict[str, specs.NetworkSpec]:
    dtype = DTYPE_NAMES[PRECISIONS[precision]]
    return {
        "text_encoder": specs.text_encoder_spec(components.text_encoder.config.hidden_size, dtype),
        "unet": specs.unet_spec(components.unet.config.cross_attention_dim, dtype),
        "vae_decoder": specs.vae_decoder_spec(dtype),
    }


def sample_inputs(name: str, components: Components, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs of real scale at batch 2 (so no axis is traced as 1)."""
    gen = torch.Generator().manual_seed(0)
    h, w = sample_latent_size(components)
    if name == "text_encoder":
        vocab = components.text_encoder.config.vocab_size
        return (torch.randint(0, vocab, (2, specs.TEXT_TOKENS), generator=gen, dtype=torch.int32),)
    if name in ("unet", FUSED_UNET):
        context_dim = components.unet.config.cross_attention_dim
        return (torch.randn(2, specs.LATENT_CHANNELS, h, w, generator=gen).to(dtype),
                torch.tensor([981.0]),
                torch.randn(2, specs.TEXT_TOKENS, context_dim, generator=gen).to(dtype))
    return (torch.randn(2, specs.LATENT_CHANNELS, h, w, generator=gen).to(dtype),)


def in_dtype(components: Components, dtype: torch.dtype) -> Components:
    """The components with UNet and VAE in `dtype`: cast copies where needed (the caller's modules keep theirs),
    made once per export so the two UNet graphs trace one copy. The text encoder runs in its own dtype."""
    def cast(module):
        return module if next(module.parameters()).dtype == dtype else copy.deepcopy(module).to(dtype)
    return dataclasses.replace(components, unet=cast(components.unet), vae=cast(components.vae))


def export_module(name: str, components: Components, dtype: torch.dtype, sag_layer: str):
    """The module torch.onnx.export traces for network `name` (components already `in_dtype`)."""
    if name == "text_encoder":
        return TextEncoderWithLayers(components.text_encoder, out_dtype=dtype).eval()
    if name in ("unet", FUSED_UNET):
        return UNetWithScore(components.unet, sag_layer, fused=name == FUSED_UNET).eval()
    return VaeDecoder(components.vae).eval()


def sag_map_downsamplings(components: Components, sag_layer: str) -> int:
    """How many stride-2 levels below the latent the SAG layer's map lies (HM = map_side(H, k))."""
    h, w = sample_latent_size(components)
    sample, timestep, context = sample_inputs("unet", components, torch.float32)
    with torch.no_grad(), capture_sag_score(components.unet, sag_layer) as capture:
        components.unet(sample[:1], timestep, encoder_hidden_states=context[:1])
    map_size = tuple(capture.map_size)
    for k in range(8):
        if (specs.map_side(h, k), specs.map_side(w, k)) == map_size:
            return k
    raise ExportError(f"SAG layer {sag_layer!r} has map {map_size} for latent {h}x{w}: not a downsampling of the "
                      f"latent")


def export_network(name: str, components: Components, spec: specs.NetworkSpec, folder: Path, *, opset: int,
                   dtype: torch.dtype, sag_layer: str, external_data: bool | None) -> list[str]:
    """Writes `folder/<name>.onnx` (and `<name>.onnx.data` with external data); returns the file names."""
    with artifacts.interrupts_deferred():  # an interrupt inside onnx's native module init aborts the process
        import onnx

    raw = folder / f".raw-{name}"
    raw.mkdir()
    raw_path = raw / spec.filename
    module = export_module(name, components, dtype, sag_layer)
    # Ctrl-C or SIGTERM waits for the trace to end: an interrupt raised inside torch's tracer was seen to crash
    # the process (SIGSEGV) instead of unwinding into the export's cleanup
    with torch.no_grad(), warnings.catch_warnings(), artifacts.interrupts_deferred():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic the dynamic axes already cover
        torch.onnx.export(module, sample_inputs(name, components, dtype), str(raw_path), dynamo=False,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1} if name == FUSED_UNET else None)
    raw_bytes = sum(f.stat().st_size for f in raw.iterdir())
    if external_data is None:  # the UNet's two graphs always share one weights file; others only when too big
        external = raw_bytes >= EXTERNAL_DATA_THRESHOLD or name in ("unet", FUSED_UNET)
    else:
        external = external_data
    # re-save so a large graph's weights sit in one data file beside it instead of one file per tensor
    model = onnx.load(str(raw_path))
    declare_io_shapes(model.graph, spec)
    data_name = f"{spec.filename}.data"
    if external and name == FUSED_UNET:
        share_weights(model, folder / "unet.onnx")
    onnx.save_model(model, str(folder / spec.filename), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    shutil.rmtree(raw)
    onnx.checker.check_model(str(folder / spec.filename))
    names = [spec.filename, data_name] if (folder / data_name).exists() else [spec.filename]
    for written in names:
        artifacts.set_usual_mode(folder / written)  # onnx writes external data files 0600
    return names


def share_weights(model, exported: Path) -> None:
    """Points every weight of `model` that `exported` (a graph saved with external data beside it) already stores,
    byte for byte, at that stored copy, so two graphs of one network share one weights file on disk."""
    import hashlib

    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    stored = {}
    with open(exported.with_name(f"{exported.name}.data"), "rb") as data:
        for tensor in onnx.load(str(exported), load_external_data=False).graph.initializer:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                data.seek(info.offset)
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data.read(info.length)).digest())
                stored[key] = tensor.external_data
    for tensor in model.graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
        if key in stored:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            tensor.external_data.extend(stored[key])


def declare_io_shapes(graph, spec: specs.NetworkSpec) -> None:
    """Writes the spec's dimensions on the graph's inputs and outputs: fixed sizes as values, dynamic ones
    under the spec's names (the tracer names some after internal nodes, e.g. "Casthidden_dim_1")."""
    declared = {t.name: t.shape for t in spec.inputs + spec.outputs}
    for value in list(graph.input) + list(graph.output):
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for size in declared[value.name]:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def export_key(precision: str, opset: int, sag_layer: str) -> str:
    """Folder name of one export request under the model's cache folder."""
    layer = sag_layer.replace(".transformer_blocks.", "-tb").replace(".attentions.", "-a").replace(".", "-")
    return f"{precision}-opset{opset}-{layer}"


def export_folder(fingerprint: str, out_dir=None, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                  sag_layer: str = MID_BLOCK_LAYER) -> Path:
    """`out_dir`, or the cache folder of this model and request."""
    if out_dir is not None:
        return Path(out_dir)
    return artifacts.artifact_dir(fingerprint, "onnx", export_key(precision, opset, sag_layer))


def request_fields(fingerprint: str, opset: int, precision: str, sag_layer: str) -> dict:
    """The manifest keys an existing export must match to be reused."""
    return {"kind": "onnx", "sagrt_version": __version__, "model_fingerprint": fingerprint, "opset": opset,
            "precision": precision, "sag_layer": sag_layer}


def redo_command(model_source: str, folder: Path, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                 sag_layer: str = MID_BLOCK_LAYER) -> str:
    command = f"sagrt export --model {model_source} --out {folder}"
    if opset != DEFAULT_OPSET:
        command += f" --opset {opset}"
    if precision != "fp32":
        command += f" --precision {precision}"
    if sag_layer != MID_BLOCK_LAYER:
        command += f" --sag-layer {sag_layer}"
    return command + " --force"


def verify_export(folder: str | Path, wanted: dict | None = None, model: str | None = None,
                  full: bool | None = None) -> dict:
    """The folder's manifest after checking it is an ONNX export matching `wanted` and that every file it lists
    is inside the folder and has its recorded size and sha256; raises ExportError saying what differs and the
    command that redoes the export (for `model`, default the manifest's, with the wanted settings).
    `full`: hash every file rather than trust the stat record (None: once per boot of the machine), and check
    that the graphs read no weights file the manifest does not list."""
    folder = Path(folder)
    manifest = artifacts.read_manifest(folder)
    if not isinstance(manifest, dict):
        raise ExportError(f"{folder} holds no ONNX export (no readable {artifacts.MANIFEST}): "
                          f"run `sagrt export --model {model or 'MODEL'} --out {folder}`")
    settings = {**manifest, **(wanted or {})}
    try:
        redo = redo_command(model or manifest.get("model_source", "MODEL"), folder,
                            settings.get("opset", DEFAULT_OPSET), settings.get("precision", "fp32"),
                            settings.get("sag_layer", MID_BLOCK_LAYER))
    except (TypeError, AttributeError):
        redo = redo_command(model or "MODEL", folder)
    differences = artifacts.manifest_differences(manifest, {"kind": "onnx", **(wanted or {})})
    if differences:
        raise ExportError(f"export in {folder} does not match: {'; '.join(differences)}; redo it with `{redo}`")
    files = manifest.get("files")
    try:
        graphs = export_graphs(manifest)
        for graph in graphs:
            if graph not in files:
                raise ExportError(f"the manifest in {folder} names graph {graph!r} without its sha256: the folder "
                                  f"is damaged or not sagrt's; redo the export with `{redo}`")
        hashed_in_full = artifacts.check_files(folder, files, f"redo the export with `{redo}`", full)
        if hashed_in_full:
            check_external_data(folder, graphs, files, redo)
    except artifacts.ArtifactError as err:
        raise ExportError(str(err)) from None
    return manifest


def export_graphs(manifest: dict) -> list[str]:
    """The ONNX files of an export: one per network, and the fused-attention UNet."""
    networks, fused = manifest.get("networks"), manifest.get("fused_attention_unet")
    if not isinstance(networks, dict) or not isinstance(fused, str) or not isinstance(manifest.get("files"), dict):
        raise ExportError("the manifest lacks its networks, files or fused_attention_unet entry: the folder is "
                          "damaged or not sagrt's; export it again")
    return sorted({f"{name}.onnx" for name in networks} | {fused})


def check_external_data(folder: Path, graphs: list[str], files: dict, redo: str) -> None:
    """Every weights file a graph points to is a file of the manifest (so it is inside the folder and hashed)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for graph in graphs:
        try:
            model = onnx.load(str(folder / graph), load_external_data=False)
        except Exception as err:  # protobuf's DecodeError and friends: a file that is no ONNX graph
            raise ExportError(f"{graph} in {folder} is not a readable ONNX graph ({type(err).__name__}): "
                              f"redo the export with `{redo}`") from None
        for tensor in model.graph.initializer:
            if uses_external_data(tensor) and ExternalDataInfo(tensor).location not in files:
                raise ExportError(f"{graph} in {folder} reads weights from {ExternalDataInfo(tensor).location!r}, "
                                  f"which the manifest does not list: redo the export with `{redo}`")


STAGING = ".export-"  # prefix of the staging folders inside an export folder


def claim_folder(folder: Path) -> set[str]:
    """Makes `folder` ready for a new export and returns the files an earlier export of sagrt left there (to be
    replaced). Refuses a folder that is a file, or that holds files but no sagrt manifest: a folder sagrt did not
    make never loses a file. Staging folders of exports that died (kill -9) are removed."""
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"export folder {folder} is an existing file: choose a folder with --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot make export folder {folder}: {err.strerror or err}") from None
    owned = artifacts.owned_files(folder, "onnx")
    artifacts.remove_stale_staging(folder, STAGING, legacy=owned is not None)
    if owned is None:
        foreign = artifacts.foreign_entries(folder, STAGING)
        if foreign:
            unreadable = " (its manifest.json is no readable sagrt ONNX manifest)" if artifacts.MANIFEST in foreign \
                else ""
            raise ExportError(f"{folder} holds files sagrt did not write{unreadable}, e.g. {foreign[0]!r}: export "
                              f"into a new or empty folder (sagrt never removes files it did not write)")
        owned = set()
    return owned


def move_into_place(staging: Path, folder: Path, names: list[str]) -> None:
    """Moves each staged file (relative name) to the same name in `folder`, replacing the file there."""
    for name in names:
        target = artifacts.member(folder, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)


def export_model(model, out_dir=None, *, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                 sag_layer: str = MID_BLOCK_LAYER, force: bool = False, external_data: bool | None = None,
                 progress: bool = True) -> Path:
    """Exports `model` (preset name, diffusers folder or Components) to ONNX and returns the export folder.
    An export whose manifest matches the request is reused; `force` redoes it. Only files a sagrt manifest lists
    are ever replaced or removed."""
    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: choose {' or '.join(EXPORT_PRECISIONS)}")
    check_opset(opset)
    fingerprint = model.fingerprint if isinstance(model, Components) else model_fingerprint(model)
    folder = export_folder(fingerprint, out_dir, precision, opset, sag_layer)
    wanted = request_fields(fingerprint, opset, precision, sag_layer)
    manifest = None if force or not folder.is_dir() else artifacts.read_manifest(folder)
    if manifest is not None and out_dir is None and manifest.get("sagrt_version") != wanted["sagrt_version"]:
        manifest = None  # sagrt's own cache is redone after an upgrade; a folder the user named is only checked
    if manifest is not None:
        verify_export(folder, wanted, None if isinstance(model, Components) else str(model))
        return folder

    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        owned = claim_folder(folder)
        components = model if isinstance(model, Components) else load_model(model, safety_checker=False)
        resolve_layer(components.unet, sag_layer)
        with artifacts.staging_dir(folder, STAGING) as staging:
            names = export_files(components, staging, opset=opset, precision=precision, sag_layer=sag_layer,
                                 external_data=external_data, progress=progress)
            # from here the folder is not finished: the claim remembers what sagrt owns in it, old and new
            artifacts.write_claim(folder, "onnx", owned | set(names))
            (folder / artifacts.MANIFEST).unlink(missing_ok=True)  # the old manifest must not vouch for new files
            artifacts.remove_owned(folder, sorted(owned - set(names)))
            move_into_place(staging, folder, names)
        manifest = {
            **wanted,
            "model_source": components.source,
            "model_info": ModelInfo.of(components, sag_layer).to_dict(),
            "sag_map_downsamplings": sag_map_downsamplings(components, sag_layer),
            "files": {name: {"sha256": digest, "bytes": (folder / name).stat().st_size}
                      for name, digest in artifacts.recorded_sha256s(folder, names, full=True).items()},
            "networks": {name: spec.to_table() for name, spec in network_specs(components, precision).items()},
            "fused_attention_unet": f"{FUSED_UNET}.onnx",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        artifacts.write_manifest(folder, manifest)
        (folder / artifacts.CLAIM).unlink(missing_ok=True)
    except OSError as err:  # a full disk, a read-only folder...
        remove_created(created)
        raise ExportError(f"cannot write the export in {folder}: {err.strerror or err}") from None
    except BaseException:
        remove_created(created)
        raise
    return folder


def remove_created(created: list[Path]) -> None:
    """Removes the folders this export made, innermost first, where they are still empty."""
    for path in created:
        with contextlib.suppress(OSError):
            path.rmdir()


def check_opset(opset) -> None:
    from torch.onnx import _constants

    low, high = MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ExportError(f"opset {opset!r} is outside what this export supports ({low} to {high}; default "
                          f"{DEFAULT_OPSET})")


def export_files(components: Components, staging: Path, *, opset: int, precision: str, sag_layer: str,
                 external_data: bool | None, progress: bool) -> list[str]:
    """Exports every graph, the tokenizer and the scheduler into `staging`; returns the relative file names."""
    dtype = PRECISIONS[precision]
    network_table = network_specs(components, precision)
    graphs = {**network_table, FUSED_UNET: dataclasses.replace(network_table["unet"], name=FUSED_UNET)}
    traced = in_dtype(components, dtype)
    names = []
    steps = tqdm(list(graphs) + ["tokenizer+scheduler"], desc="export", unit="part", disable=not progress)
    for name in steps:
        steps.set_postfix_str(name)
        if name in graphs:
            names += export_network(name, traced, graphs[name], staging, opset=opset, dtype=dtype,
                                    sag_layer=sag_layer, external_data=external_data)
        else:
            components.tokenizer.save_pretrained(staging / "tokenizer")
            save_scheduler(components.scheduler, staging / "scheduler")
    return sorted(names) + sorted(p.relative_to(staging).as_posix() for sub in ("tokenizer", "scheduler")
                                  for p in (staging / sub).rglob("*") if p.is_file())
