"""The tensorrt backend: sagrt's engines behind the Runners interface, on torch CUDA tensors.

Each network is an `Engine` with the life cycle of TensorRT's diffusion demo and Polygraphy's
runners: load -> activate -> allocate -> infer -> deactivate, each state-checked. All engines run
on one CUDA stream and share one device-memory allocation (they never run at the same time).
Every input shape is checked against the built profile before TensorRT sees it. With static
shapes, each engine captures one CUDA graph per input shape (the UNet: B and 2B).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sagrt.engine.profiles import BuildConfig, check_shapes, covering_config, symbolic_dims
from sagrt.engine.tensorrt_build import rebuild_command, require_tensorrt, this_platform
from sagrt.errors import SagrtError
from sagrt.export.artifacts import check_files, manifest_differences, member, read_manifest
from sagrt.export.specs import NetworkSpec
from sagrt.runtime.runners import ModelInfo, Runners

# TensorRT DataType name -> torch dtype: the one dtype table (keyed by name so it is usable without TensorRT)
TRT_TO_TORCH = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}
NETWORKS = ("text_encoder", "unet", "vae_decoder")


class EngineError(SagrtError):
    """Engines that cannot serve a request here: missing, built elsewhere, or shapes outside their profile."""


class EngineStateError(RuntimeError):
    """An Engine method called out of its life cycle order (a programming error)."""


def torch_dtype(trt_dtype) -> torch.dtype:
    """torch dtype of a tensorrt.DataType."""
    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in TRT_TO_TORCH:
        raise EngineError(f"TensorRT dtype {name} has no torch equivalent sagrt binds")
    return TRT_TO_TORCH[name]


# ---- manifests ---------------------------------------------------------------------------------
def engine_table(manifest: dict) -> dict:
    """{file: {"sha256", "bytes"}} of the engines a TensorRT manifest lists."""
    engines = manifest.get("engines")
    if not isinstance(engines, dict) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                for e in engines.values()):
        raise EngineError("the engine table of the manifest is malformed: build the engines again with --force")
    return {e["file"]: {"sha256": e.get("sha256"), "bytes": e.get("bytes")} for e in engines.values()}


def read_engine_manifest(engine_dir: str | Path) -> dict:
    manifest = read_manifest(engine_dir)
    if not manifest or manifest.get("kind") != "tensorrt":
        raise EngineError(f"no finished TensorRT build in {engine_dir} (manifest.json missing): "
                          f"build one with: sagrt build --model MODEL --out {engine_dir}")
    return manifest


def check_platform(manifest: dict, platform: dict, engine_dir: str | Path) -> None:
    """Engines run only on the GPU model and TensorRT version that built them."""
    differences = manifest_differences(manifest, platform)
    if differences:
        raise EngineError(f"TensorRT engines in {engine_dir} were built for another machine "
                          f"({'; '.join(differences)}); rebuild them here with: {rebuild_command(manifest, engine_dir)}")


def shape_rebuild_command(manifest: dict, engine_dir, network: str, shapes: dict[str, tuple]) -> str:
    """The build command whose profiles would include this call."""
    inputs = NetworkSpec.from_table(network, manifest["engines"][network]).inputs
    config = BuildConfig.from_dict(manifest["build_config"])
    scale = manifest["model_info"]["vae_scale_factor"]
    wider = covering_config(config, network, symbolic_dims(inputs, shapes), scale)
    return rebuild_command(manifest, engine_dir, wider)


# ---- one engine --------------------------------------------------------------------------------
@dataclass
class ShapeBinding:
    """An execution context set up for one set of input shapes, its I/O tensors and its CUDA graph."""

    context: object
    tensors: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    runs: int = 0


@dataclass
class Engine:
    """One TensorRT engine file. Owns its contexts and I/O buffers, not the device memory it runs in."""

    name: str
    path: Path
    profile: dict[str, list]  # input -> [min, opt, max] shape
    rebuild: Callable[[dict], str] = lambda shapes: "sagrt build --force"  # command for an out-of-profile call
    cuda_graph: bool = False
    state: str = "new"
    trt: object = None
    engine: object = None
    device_memory: torch.Tensor | None = None
    bindings: dict[tuple, ShapeBinding] = field(default_factory=dict)
    inputs: dict[str, torch.dtype] = field(default_factory=dict)
    outputs: dict[str, torch.dtype] = field(default_factory=dict)

    def _require(self, state: str, method: str) -> None:
        if self.state != state:
            order = {"new": "load()", "loaded": "activate()", "active": "deactivate()"}
            raise EngineStateError(f"TensorRT engine {self.name}: {method}() needs the engine {state}, it is "
                                   f"{self.state} (life cycle: load -> activate -> infer -> deactivate; "
                                   f"call {order.get(self.state, 'load()')} first)")

    # 1. load: deserialize the plan
    def load(self, trt, runtime) -> None:
        self._require("new", "load")
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {self.path} (truncated, or from another TensorRT): "
                              "rebuild it with sagrt build --force")
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            table = self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs
            table[name] = torch_dtype(self.engine.get_tensor_dtype(name))
        self.trt, self.state = trt, "loaded"

    @property
    def device_memory_size(self) -> int:
        """Scratch memory one context needs, the largest over the profile."""
        return self.engine.device_memory_size_v2

    # 2. activate: run in the given (shared) device memory
    def activate(self, device_memory: torch.Tensor) -> None:
        self._require("loaded", "activate")
        if device_memory.numel() < self.device_memory_size:
            raise EngineStateError(f"TensorRT engine {self.name}: device memory of {device_memory.numel()} bytes, "
                                   f"needs {self.device_memory_size}")
        self.device_memory = device_memory
        self.state = "active"

    # 3. allocate: a context and I/O tensors for one set of input shapes
    def allocate(self, shapes: dict[str, tuple]) -> ShapeBinding:
        self._require("active", "allocate")
        check_shapes(self.name, shapes, self.profile, lambda: self.rebuild(shapes))
        device, tensors = self.device_memory.device, {}
        # contexts share the device memory; each keeps its own shapes, so a CUDA graph never sees another's.
        # A context must be made on the engine's own GPU, whichever device is current for the caller.
        with torch.cuda.device(device):
            context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.device_memory.data_ptr(), self.device_memory.numel())
        for name, dtype in self.inputs.items():
            context.set_input_shape(name, shapes[name])
            tensors[name] = torch.empty(shapes[name], dtype=dtype, device=device)
        for name, dtype in self.outputs.items():
            tensors[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=device)
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())
        binding = self.bindings[_key(shapes)] = ShapeBinding(context, tensors)
        return binding

    # 4. infer
    def infer(self, feed: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Runs on `stream`, ordered after the caller's stream, without host synchronisation.
        Returns fresh output tensors: the engine's own buffers are overwritten by the next call."""
        self._require("active", "infer")
        if set(feed) != set(self.inputs):
            raise EngineStateError(f"TensorRT engine {self.name}: inputs {sorted(feed)} given, "
                                   f"expects {sorted(self.inputs)}")
        shapes = {name: tuple(t.shape) for name, t in feed.items()}
        binding = self.bindings.get(_key(shapes)) or self.allocate(shapes)
        caller = torch.cuda.current_stream(stream.device)
        for name, value in feed.items():
            binding.tensors[name].copy_(value)  # also casts, e.g. int64 token ids -> int32
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            self._execute(binding, stream)
        caller.wait_stream(stream)
        return {name: binding.tensors[name].clone() for name in self.outputs}

    def _execute(self, binding: ShapeBinding, stream: torch.cuda.Stream) -> None:
        if binding.graph is not None:
            binding.graph.replay()
            return
        if not binding.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT engine {self.name}: execute_async_v3 failed (see the TensorRT log)")
        binding.runs += 1
        if self.cuda_graph and binding.runs == 1:
            # captured after one warm-up run; replays launch the same kernels on the same buffers
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = binding.context.execute_async_v3(stream.cuda_stream)
            # a failed enqueue under capture leaves an empty graph whose replays would do nothing
            binding.graph = graph if captured else None

    # 5. deactivate
    def deactivate(self) -> None:
        self._require("active", "deactivate")
        self.bindings.clear()  # graphs and contexts go before the memory they point into
        self.device_memory = None
        self.state = "loaded"

    def __del__(self):
        if self.state == "active":
            import warnings

            warnings.warn(f"TensorRT engine {self.name} was never deactivated", ResourceWarning, stacklevel=1)


def _key(shapes: dict[str, tuple]) -> tuple:
    return tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))


# ---- the backend -------------------------------------------------------------------------------
class TensorRTRunners(Runners):
    """The three runner calls on sagrt-built TensorRT engines (one folder from `sagrt build`)."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, device: str | torch.device = "cuda", cuda_graph: bool | None = None):
        trt = require_tensorrt("the tensorrt backend")
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest = read_engine_manifest(self.engine_dir)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"the tensorrt backend runs on CUDA devices, not {self.device}: drop --device or "
                              "pass --device cuda:N")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        check_platform(manifest, this_platform(trt, self.device.index), self.engine_dir)
        self.info = ModelInfo(**manifest["model_info"])
        if cuda_graph is None:
            cuda_graph = bool(manifest["build_config"]["static"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        # every engine inside the folder, of its size and sha256 (read in full once per boot, see check_files)
        check_files(self.engine_dir, engine_table(manifest),
                    f"rebuild with: {rebuild_command(manifest, self.engine_dir)}")
        self.engines = {}
        with torch.cuda.device(self.device):
            for network in NETWORKS:
                entry = manifest["engines"][network]
                engine = Engine(network, member(self.engine_dir, entry["file"]), entry["profile"],
                                lambda shapes, n=network: shape_rebuild_command(manifest, self.engine_dir, n, shapes),
                                cuda_graph=cuda_graph)
                engine.load(trt, self.runtime)
                self.engines[network] = engine
            self.stream = torch.cuda.Stream(self.device)
            # one scratch allocation for all engines: they run one after another on one stream
            size = max(engine.device_memory_size for engine in self.engines.values())
            self.device_memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for engine in self.engines.values():
                engine.activate(self.device_memory)
        self.dtype = self.engines["unet"].inputs["sample"]

    def encode_text(self, input_ids, clip_skip=None, attention_mask=None):
        if attention_mask is not None:
            raise EngineError("this model's text encoder takes an attention mask, which the exported graph does "
                              "not: use --backend torch for it")
        out = self.engines["text_encoder"].infer({"input_ids": input_ids.to(self.device)}, self.stream)
        # layer_hidden[i] = final_layer_norm(hidden_states[i]), so clip_skip k reads layer_hidden[-(k + 1)]
        return out["hidden"] if clip_skip is None else out["layer_hidden"][-(clip_skip + 1)]

    def unet(self, sample, timestep, context, cross_attention_kwargs=None):
        if cross_attention_kwargs:
            raise EngineError("cross_attention_kwargs cannot reach a built TensorRT engine: use --backend torch")
        timestep = torch.as_tensor(timestep, device=self.device).reshape(1)  # [1] float32 on the device
        out = self.engines["unet"].infer({"sample": sample, "timestep": timestep, "encoder_hidden_states": context},
                                         self.stream)
        return out["noise_pred"], out["attn_score"]

    def decode(self, latents):
        return self.engines["vae_decoder"].infer({"latent": latents}, self.stream)["image"]

    def close(self) -> None:
        for engine in getattr(self, "engines", {}).values():
            if engine.state == "active":
                engine.deactivate()
        self.device_memory = None


def check_model(manifest: dict, model, engine_dir) -> None:
    """Engines answer for the model they were built from, not for whatever --model names."""
    from sagrt.export.models import PRESETS

    # a model's source is its preset name, or its folder's resolved path (export/models.py)
    built, asked = str(manifest["model_source"]), str(model) if str(model) in PRESETS else str(Path(model).resolve())
    if built != asked:
        raise EngineError(f"the engines in {engine_dir} were built for model {built!r}, not {asked!r}: build "
                          f"engines for it with: sagrt build --model {shlex.quote(str(model))} --out NEW_DIR")


def load_runners(model, device=None, sag_layer=None, engine_dir=None, build: BuildConfig | None = None,
                 cuda_graph: bool | None = None, progress: bool = True) -> "TensorRTRunners":
    """TensorRT runners for `model`. `engine_dir`: a folder from `sagrt build`; otherwise engines for
    `build` (default BuildConfig) are built on first use, as the onnxruntime backend exports on first use."""
    from sagrt.engine.tensorrt_build import build_for_model
    from sagrt.export.attention import MID_BLOCK_LAYER

    require_tensorrt("--backend tensorrt")
    if engine_dir is None:
        engine_dir = build_for_model(model, build or BuildConfig(), sag_layer=sag_layer or MID_BLOCK_LAYER,
                                     progress=progress)
    runners = TensorRTRunners(engine_dir, device or "cuda", cuda_graph)
    check_model(runners.manifest, model, engine_dir)
    return runners
