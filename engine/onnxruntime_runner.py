"""ONNX Runtime runners: the three calls of sagrt.runners.Runners on the sessions of one export folder.

Execution providers come in the order TensorRT EP, CUDA EP, CPU (those installed), or as named. On CUDA,
inputs and outputs are bound to torch tensors on the device (I/O binding), so nothing crosses to the host;
on CPU the same binding path can be asked for with `io_binding=True` (it is how tests reach that code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sagrt import __version__
from sagrt.errors import SagrtError
from sagrt.export import artifacts, specs
from sagrt.export.onnx_export import ExportError, verify_export
from sagrt.networks import DTYPE_NAMES, NETWORKS, PRECISIONS, TORCH_DTYPES
from sagrt.runners import ModelInfo, Runners

PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class ProviderError(SagrtError):
    """An execution provider that is unknown or not installed here."""


class OrtInputError(SagrtError):
    """A call the exported graphs cannot serve (what a compiled graph cannot take)."""


def resolve_providers(providers=None, available: list[str] | None = None) -> list[str]:
    """Provider names in priority order: `providers` (names or aliases tensorrt, cuda, cpu; a list or a
    comma-separated string), or automatically TensorRT EP, CUDA EP, CPU among those installed."""
    import onnxruntime as ort

    available = list(ort.get_available_providers() if available is None else available)
    if providers is None:
        return [name for name in AUTO_ORDER if name in available]
    if isinstance(providers, str):
        providers = [part.strip() for part in providers.split(",") if part.strip()]
    resolved = []
    for requested in providers:
        name = PROVIDER_ALIASES.get(requested.lower(), requested)
        if name not in ort.get_all_providers():
            raise ProviderError(f"unknown execution provider {requested!r}: use tensorrt, cuda or cpu (installed "
                                f"here: {', '.join(available)})")
        if name not in available:
            raise ProviderError(f"execution provider {requested!r} ({name}) is not installed here (installed: "
                                f"{', '.join(available)}); for CUDA/TensorRT install onnxruntime-gpu")
        resolved.append(name)
    if not resolved:
        raise ProviderError("no execution provider named: use tensorrt, cuda or cpu")
    return resolved


def session_options(on_gpu: bool, graph_optimization: str = "all", intra_op_threads: int = 0):
    """The SessionOptions of every sagrt session (OrtRunners, and benchmarks that profile what it runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    levels = ort.GraphOptimizationLevel
    options.graph_optimization_level = {"all": levels.ORT_ENABLE_ALL, "extended": levels.ORT_ENABLE_EXTENDED,
                                        "basic": levels.ORT_ENABLE_BASIC, "none": levels.ORT_DISABLE_ALL,
                                        }[graph_optimization]
    options.intra_op_num_threads = intra_op_threads
    if not on_gpu:
        # ORT's workers spin between the nodes of a run (fast hand-over on graphs of many small nodes) and,
        # by default, for a while after it, which steals the cores from the torch ops between engine calls
        # (SAG blur, scheduler step); stop the spinning when a run ends (docs/NOTES.md has the measurement).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # The memory pattern pre-plans one block per input shape (the UNet runs at B and 2B): without it
        # peak memory is lower and steps are faster (benchmarks/RESULTS.md).
        options.enable_mem_pattern = False
    return options


def unet_graph(manifest: dict, providers: list[str], fused_attention: bool = True) -> str:
    """The UNet file ONNX Runtime runs: the graph with fused attention on the CPU and CUDA providers, the
    portable unet.onnx when TensorRT's provider comes first (its parser does not know com.microsoft operators)."""
    if fused_attention and providers[0] != "TensorrtExecutionProvider":
        return manifest["fused_attention_unet"]
    return "unet.onnx"


class OrtRunners(Runners):
    """Runners over the ONNX Runtime sessions of an export folder (see export.onnx_export)."""

    name = "onnxruntime"
    thread_safe = True  # InferenceSession.run may be called from several threads; each call binds its own I/O

    def __init__(self, export_dir: str | Path, providers=None, *, device_id: int = 0, io_binding: bool | None = None,
                 wanted: dict | None = None, model: str | None = None, graph_optimization: str = "all",
                 intra_op_threads: int = 0, fused_attention: bool = True):
        """`wanted`: manifest values the export must have; `model`: named in the redo command of errors.
        `fused_attention`: on the CPU and CUDA providers run the export's UNet graph with fused attention
        (com.microsoft MultiHeadAttention); the TensorRT provider always runs the portable unet.onnx."""
        self.export_dir = Path(export_dir)
        self.manifest = verify_export(self.export_dir, {"sagrt_version": __version__, **(wanted or {})}, model)
        try:
            self.info = ModelInfo(**self.manifest["model_info"])
            self.specs = {name: specs.NetworkSpec.from_table(name, self.manifest["networks"][name])
                          for name in NETWORKS}
            self.map_downsamplings = int(self.manifest["sag_map_downsamplings"])
            self.dtype = PRECISIONS[self.manifest["precision"]]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ExportError(f"the manifest in {self.export_dir} is malformed ({type(err).__name__}: {err}): "
                              f"export it again with --force") from None
        self.providers = resolve_providers(providers)
        on_gpu = self.providers[0] in GPU_PROVIDERS
        self.device = torch.device("cuda", device_id) if on_gpu else torch.device("cpu")
        self.host_threads = None if on_gpu else 1
        self.io_binding = on_gpu if io_binding is None else io_binding

        options = session_options(on_gpu, graph_optimization, intra_op_threads)
        self.files = {name: spec.filename for name, spec in self.specs.items()}
        self.files["unet"] = unet_graph(self.manifest, self.providers, fused_attention)
        provider_list = [(name, self.provider_options(name, device_id)) for name in self.providers]
        self.sessions = {name: self.open_session(filename, options, provider_list)
                         for name, filename in self.files.items()}

    def open_session(self, filename: str, options, provider_list):
        """An InferenceSession over one graph of the export (a file its manifest lists, checked to be inside)."""
        import onnxruntime as ort

        if filename not in self.manifest["files"]:
            raise ExportError(f"{filename} is not a file of the export in {self.export_dir}: export it again")
        path = artifacts.member(self.export_dir, filename)
        try:
            return ort.InferenceSession(str(path), options, providers=provider_list)
        except Exception as err:  # onnxruntime's own exception types (Fail, InvalidGraph...) share no base class
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"ONNX Runtime cannot load {filename} from {self.export_dir} ({reason}): export it "
                              f"again with --force") from None

    def provider_options(self, provider: str, device_id: int) -> dict:
        if provider == "TensorrtExecutionProvider":
            # engines are built per shape range on first use; caching them makes later runs start fast
            return {"device_id": device_id, "trt_fp16_enable": self.manifest["precision"] == "fp16",
                    "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
                    "trt_engine_cache_path": str(self.export_dir / "ort-trt-cache")}
        if provider == "CUDAExecutionProvider":
            return {"device_id": device_id}
        return {}

    # ---- one session call ---------------------------------------------------------------------
    def run(self, network: str, feeds: dict[str, torch.Tensor], dims: dict[str, int],
            outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Runs one network on `feeds` (cast to the graph's input dtypes); `dims` gives the symbolic output
        sizes so output buffers can be allocated ahead (I/O binding)."""
        spec = self.specs[network]
        feeds = {t.name: feeds[t.name].to(self.device, TORCH_DTYPES[t.dtype]).contiguous() for t in spec.inputs}
        wanted = [t for t in spec.outputs if outputs is None or t.name in outputs]
        session = self.sessions[network]
        if not self.io_binding:
            arrays = session.run([t.name for t in wanted], {name: t.cpu().numpy() for name, t in feeds.items()})
            return {t.name: torch.from_numpy(array).to(self.device) for t, array in zip(wanted, arrays)}
        shapes = spec.shapes(dims)
        binding = session.io_binding()
        device_type, device_index = self.device.type, self.device.index or 0
        for name, tensor in feeds.items():
            binding.bind_input(name, device_type, device_index, np.dtype(DTYPE_NAMES[tensor.dtype]).type, tuple(tensor.shape),
                               tensor.data_ptr())
        results = {}
        for t in wanted:
            out = torch.empty(shapes[t.name], dtype=TORCH_DTYPES[t.dtype], device=self.device)
            binding.bind_output(t.name, device_type, device_index, np.dtype(DTYPE_NAMES[out.dtype]).type, tuple(out.shape),
                                out.data_ptr())
            results[t.name] = out
        if device_type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch kernels are ready
        session.run_with_iobinding(binding)  # ORT synchronizes its own stream before returning
        return results

    # ---- the three calls ----------------------------------------------------------------------
    def encode_text(self, input_ids, clip_skip=None, attention_mask=None):
        if attention_mask is not None:
            raise OrtInputError("the exported text encoder takes no attention mask (this model's text encoder "
                                "needs one): use --backend torch")
        batch = input_ids.shape[0]
        dims = {"B": batch, "L": self.info.text_layers + 1}
        if clip_skip is None:
            return self.run("text_encoder", {"input_ids": input_ids}, dims, ["hidden"])["hidden"]
        if not 0 <= clip_skip <= self.info.text_layers:
            raise OrtInputError(f"clip_skip {clip_skip} is outside 0..{self.info.text_layers} for this text encoder")
        layers = self.run("text_encoder", {"input_ids": input_ids}, dims, ["layer_hidden"])["layer_hidden"]
        return layers[-(clip_skip + 1)]

    def unet(self, sample, timestep, context, cross_attention_kwargs=None):
        if cross_attention_kwargs is not None:
            raise OrtInputError(f"cross_attention_kwargs cannot be passed to a compiled UNet ({self.name}): "
                                "drop them or use --backend torch")
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if timestep.numel() != 1 and not bool((timestep == timestep[0]).all()):
            raise OrtInputError(f"the exported UNet takes one timestep for the whole batch, got {timestep.tolist()}")
        batch, _, height, width = sample.shape
        k = self.map_downsamplings
        dims = {"B": batch, "H": height, "W": width, "HM": specs.map_side(height, k), "WM": specs.map_side(width, k)}
        out = self.run("unet", {"sample": sample, "timestep": timestep[:1], "encoder_hidden_states": context}, dims)
        return out["noise_pred"], out["attn_score"]

    def decode(self, latents):
        batch, _, height, width = latents.shape
        factor = self.info.vae_scale_factor
        dims = {"B": batch, "H": height, "W": width, "IH": height * factor, "IW": width * factor}
        return self.run("vae_decoder", {"latent": latents}, dims)["image"]

    def close(self) -> None:
        self.sessions = {}
