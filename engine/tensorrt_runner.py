"""The tensorrt backend: sagrt's engines behind the Runners interface, on torch CUDA tensors.

Each network is an `Engine` with the life cycle of TensorRT's diffusion demo and Polygraphy's
runners: load -> activate -> allocate -> infer -> deactivate, each state-checked. All engines run
on one CUDA stream and share one device-memory allocation (they never run at the same time).
Every input shape is checked against the built profile before TensorRT sees it. With static
shapes, each engine captures one CUDA graph per input shape (the UNet: B and 2B).
"""

from __future__ import annotations

import contextlib
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sagrt.engine.cuda_graphs import capture_graph
from sagrt.engine.profiles import BuildConfig, check_shapes, covering_config, pick_profile, symbolic_dims
from sagrt.engine.tensorrt_build import build_for_model, rebuild_command, require_tensorrt, this_platform
from sagrt.errors import SagrtError
from sagrt.export.artifacts import manifest_differences, member, read_manifest
from sagrt.export.models import PRESETS
from sagrt.export.specs import NetworkSpec
from sagrt.networks import MID_BLOCK_LAYER, NETWORKS
from sagrt.runners import ModelInfo, Runners

# TensorRT DataType name -> torch dtype: the one dtype table (keyed by name so it is usable without TensorRT)
TRT_TO_TORCH = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}


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


# ---- scratch memory ------------------------------------------------------------------------------
class DeviceMemory:
    """The one scratch allocation every engine and shape runs in (they run one after another on one stream),
    sized for the shapes in use: it grows when a call needs more, never to the profile maximum up front.
    `generation` counts allocations, so a context (and its CUDA graph) set up in an older one is re-pointed."""

    def __init__(self, device: torch.device, stream=None):
        self.device, self.stream = device, stream
        self.tensor: torch.Tensor | None = None
        self.generation = 0

    @property
    def size(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel()

    def reserve(self, size: int) -> None:
        """At least `size` bytes from now on; a larger buffer replaces the old one once the stream is done with it."""
        if self.tensor is not None and size <= self.size:
            return
        self.release()  # waits for the stream: TensorRT may still run in the old buffer
        self.tensor = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self.generation += 1

    def wait(self) -> None:
        """Until the stream has finished everything enqueued so far (before buffers it may use are freed)."""
        if self.stream is not None:
            self.stream.synchronize()

    def release(self) -> None:
        if self.tensor is not None:
            self.wait()
        self.tensor = None

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()


# ---- one engine --------------------------------------------------------------------------------
@dataclass
class ShapeBinding:
    """An execution context set up for one set of input shapes, its I/O tensors and its CUDA graph."""

    context: object
    tensors: dict[str, torch.Tensor]
    profile: int = 0
    memory_size: int = 0  # scratch bytes this context needs at these shapes
    memory_generation: int = -1  # DeviceMemory.generation the context points into
    graph: object | None = None
    graph_error: str | None = None  # why capture failed; the binding then runs without a graph
    runs: int = 0


@dataclass
class Engine:
    """One TensorRT engine file. Owns its contexts and I/O buffers, not the device memory it runs in.
    With `cuda_graph`, each set of input shapes gets its CUDA graph, captured after one plain run; at most
    `max_shapes` shapes are kept (the least recently used goes first), so memory stays bounded."""

    name: str
    path: Path
    profiles: list[dict[str, list]]  # per optimisation profile: input -> [min, opt, max] shape
    rebuild: Callable[[dict], str] = lambda shapes: "sagrt build --force"  # command for an out-of-profile call
    cuda_graph: bool = True
    max_shapes: int = 8
    capture: Callable = capture_graph
    state: str = "new"
    trt: object = None
    engine: object = None
    memory: DeviceMemory | None = None
    bindings: dict[tuple, ShapeBinding] = field(default_factory=dict)  # in order of last use
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
        profiles = getattr(self.engine, "num_optimization_profiles", len(self.profiles))
        if profiles != len(self.profiles):
            raise EngineError(f"TensorRT engine {self.path} has {profiles} optimisation profile(s), its manifest "
                              f"lists {len(self.profiles)}: rebuild it with sagrt build --force")
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            table = self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs
            table[name] = torch_dtype(self.engine.get_tensor_dtype(name))
        self.trt, self.state = trt, "loaded"

    @property
    def max_device_memory_size(self) -> int:
        """Scratch memory of the largest shapes of every profile (what a context would take up front)."""
        return self.engine.device_memory_size_v2

    # 2. activate: run in the given (shared) device memory
    def activate(self, memory: DeviceMemory) -> None:
        self._require("loaded", "activate")
        self.memory = memory
        self.state = "active"

    # 3. allocate: a context and I/O tensors for one set of input shapes
    def allocate(self, shapes: dict[str, tuple], stream) -> ShapeBinding:
        self._require("active", "allocate")
        check_shapes(self.name, shapes, self.profiles[0], lambda: self.rebuild(shapes))  # all share one range
        profile = pick_profile(self.profiles, shapes)
        if len(self.bindings) >= self.max_shapes:
            self._evict()
        device, tensors = self.memory.device, {}
        # A context must be made on the engine's own GPU, whichever device is current for the caller. Contexts
        # share the scratch memory; each keeps its own shapes, so a CUDA graph never sees another's.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if not context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise EngineError(f"TensorRT engine {self.name}: optimisation profile {profile} could not be selected "
                              f"(see the TensorRT log): rebuild with {self.rebuild(shapes)}")
        for name, dtype in self.inputs.items():
            if not context.set_input_shape(name, shapes[name]):
                raise EngineError(f"TensorRT engine {self.name} refused input {name} of shape {tuple(shapes[name])} "
                                  f"in profile {profile} (see the TensorRT log): rebuild with {self.rebuild(shapes)}")
            tensors[name] = torch.empty(shapes[name], dtype=dtype, device=device)
        binding = ShapeBinding(context, tensors, profile, memory_size=self.memory_size_for_shapes(context, profile))
        self.memory.reserve(binding.memory_size)
        self._point_at_memory(binding)
        for name, dtype in self.outputs.items():
            tensors[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=device)
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())
        self.bindings[_key(shapes)] = binding
        return binding

    def memory_size_for_shapes(self, context, profile: int) -> int:
        """Scratch bytes for the shapes just set on `context` (TensorRT >= 10.1; with the build's
        RUNTIME_ACTIVATION_RESIZE preview feature it follows the shapes, else it is the profile's maximum)."""
        update = getattr(context, "update_device_memory_size_for_shapes", None)
        return int(update()) if update is not None else int(self.engine.get_device_memory_size_for_profile_v2(profile))

    def _point_at_memory(self, binding: ShapeBinding) -> None:
        """Points the context at the current scratch buffer; a graph captured in an older one is dropped."""
        if binding.memory_generation == self.memory.generation:
            return
        binding.context.set_device_memory(self.memory.data_ptr(), self.memory.size)
        binding.memory_generation = self.memory.generation
        binding.graph = None  # it replays kernels with the old scratch address: recaptured on the next call

    def _evict(self) -> None:
        """Drops the least recently used shape (after the stream is done with its buffers)."""
        self.memory.wait()
        self.bindings.pop(next(iter(self.bindings)))

    # 4. infer
    def infer(self, feed: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Runs on `stream`, ordered after the caller's stream, without host synchronisation.
        Returns fresh output tensors: the engine's own buffers are overwritten by the next call."""
        self._require("active", "infer")
        if set(feed) != set(self.inputs):
            raise EngineStateError(f"TensorRT engine {self.name}: inputs {sorted(feed)} given, "
                                   f"expects {sorted(self.inputs)}")
        shapes = {name: tuple(t.shape) for name, t in feed.items()}
        key = _key(shapes)
        binding = self.bindings.pop(key, None) or self.allocate(shapes, stream)
        self.bindings[key] = binding  # most recently used last
        self._point_at_memory(binding)
        caller = torch.cuda.current_stream(stream.device)
        for name, value in feed.items():
            binding.tensors[name].copy_(value)  # also casts, e.g. int64 token ids -> int32
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            self._execute(binding, stream)
        caller.wait_stream(stream)
        return {name: binding.tensors[name].clone() for name in self.outputs}

    def _execute(self, binding: ShapeBinding, stream) -> None:
        if binding.graph is not None:
            binding.graph.replay()
            return
        self._enqueue(binding, stream)
        binding.runs += 1
        if self.cuda_graph and binding.graph_error is None:
            # captured after a plain run (TensorRT's lazy setup happens there); nothing captured runs now,
            # so this call's outputs are the plain run's
            captured = self.capture(lambda: binding.context.execute_async_v3(stream.cuda_stream), stream)
            binding.graph, binding.graph_error = captured.graph, captured.error
            if captured.error is not None:
                warnings.warn(f"TensorRT engine {self.name}: CUDA graph capture failed ({captured.error}); "
                              f"running shape {_shapes_text(binding)} without a graph", RuntimeWarning, stacklevel=3)

    def _enqueue(self, binding: ShapeBinding, stream) -> None:
        if not binding.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT engine {self.name}: execute_async_v3 failed (see the TensorRT log)")

    # 5. deactivate
    def deactivate(self) -> None:
        self._require("active", "deactivate")
        self.memory.wait()  # the stream may still run in these buffers
        self.bindings.clear()  # graphs and contexts go before the memory they point into
        self.memory = None
        self.state = "loaded"

    def __del__(self):
        if self.state == "active":
            warnings.warn(f"TensorRT engine {self.name} was never deactivated", ResourceWarning, stacklevel=1)


def _key(shapes: dict[str, tuple]) -> tuple:
    return tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))


def _shapes_text(binding: ShapeBinding) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in binding.tensors.items())


# ---- the backend -------------------------------------------------------------------------------
class TensorRTRunners(Runners):
    """The three runner calls on sagrt-built TensorRT engines (one folder from `sagrt build`).
    `cuda_graph` (default on): one CUDA graph per engine and input shapes, replayed on later calls."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, device: str | torch.device = "cuda", cuda_graph: bool = True,
                 max_shapes: int = 8):
        trt = require_tensorrt("the tensorrt backend")
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest = read_engine_manifest(self.engine_dir)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"the tensorrt backend runs on CUDA devices, not {self.device}: use device "
                              "cuda or cuda:N")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        check_platform(manifest, this_platform(trt, self.device.index), self.engine_dir)
        self.info = ModelInfo(**manifest["model_info"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {}
        with torch.cuda.device(self.device):
            for network in NETWORKS:
                entry = manifest["engines"][network]
                if "profiles" not in entry:  # one profile per engine, from a sagrt before the UNet's B/2B pair
                    raise EngineError(f"the engines in {self.engine_dir} were built by an older sagrt: rebuild them "
                                      f"with: {rebuild_command(manifest, self.engine_dir)}")
                engine = Engine(network, member(self.engine_dir, entry["file"]), entry["profiles"],
                                lambda shapes, n=network: shape_rebuild_command(manifest, self.engine_dir, n, shapes),
                                cuda_graph=cuda_graph, max_shapes=max_shapes)
                if not engine.path.is_file() or engine.path.stat().st_size != entry["bytes"]:
                    raise EngineError(f"engine file {engine.path} is missing or truncated: rebuild with: "
                                      f"{rebuild_command(manifest, self.engine_dir)}")
                engine.load(trt, self.runtime)
                self.engines[network] = engine
            self.stream = torch.cuda.Stream(self.device)
            # one scratch buffer for all engines, grown to the largest shapes actually run
            self.device_memory = DeviceMemory(self.device, self.stream)
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
            raise EngineError("cross_attention_kwargs cannot reach a built TensorRT engine: use the torch backend")
        timestep = torch.as_tensor(timestep, device=self.device).reshape(1)  # [1] float32 on the device
        out = self.engines["unet"].infer({"sample": sample, "timestep": timestep, "encoder_hidden_states": context},
                                         self.stream)
        return out["noise_pred"], out["attn_score"]

    def decode(self, latents):
        return self.engines["vae_decoder"].infer({"latent": latents}, self.stream)["image"]

    def close(self) -> None:
        """Waits for the engines' stream, then frees contexts, buffers and scratch memory."""
        for engine in getattr(self, "engines", {}).values():
            if engine.state == "active":
                engine.deactivate()
        if getattr(self, "device_memory", None) is not None:
            self.device_memory.release()


def check_built_from(manifest: dict, model, engine_dir) -> None:
    """Engines answer for the model they were built from, not for whatever --model names."""
    # a model's source is its preset name, or its folder's resolved path (export/models.py)
    built, asked = str(manifest["model_source"]), str(model) if str(model) in PRESETS else str(Path(model).resolve())
    if built != asked:
        raise EngineError(f"the engines in {engine_dir} were built for model {built!r}, not {asked!r}: build "
                          f"engines for it with: sagrt build --model {shlex.quote(str(model))} --out NEW_DIR")


def load_runners(model, device=None, sag_layer=None, engine_dir=None, build: BuildConfig | None = None,
                 cuda_graph: bool = True, progress: bool = True) -> "TensorRTRunners":
    """TensorRT runners for `model`. `engine_dir`: a folder from `sagrt build`; otherwise engines for
    `build` (default BuildConfig) are built on first use, as the onnxruntime backend exports on first use."""
    require_tensorrt("--backend tensorrt")
    if engine_dir is None:
        engine_dir = build_for_model(model, build or BuildConfig(), sag_layer=sag_layer or MID_BLOCK_LAYER,
                                     progress=progress)
    runners = TensorRTRunners(engine_dir, device or "cuda", cuda_graph)
    check_built_from(runners.manifest, model, engine_dir)
    return runners
