"""The backend registry: one entry per backend, each with its options dataclass, checked once.

`load(model, backend, **options)` resolves the backend name once ('auto' picks the fastest usable here),
builds that backend's options (refusing any option it does not take), loads its runners and returns one
`LoadedModel`. To add a backend: write its runners (engine/), an options dataclass and a loader here, and
register a `Backend` in REGISTRY.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPTokenizer

from sagrt.engine.packages import onnxruntime_missing
from sagrt.errors import SagrtError
from sagrt.export.attention import resolve_layer
from sagrt.export.models import PRESETS, load_model, load_safety_checker, load_scheduler
from sagrt.networks import MID_BLOCK_LAYER, PRECISIONS
from sagrt.runners import ModelInfo, Runners
from sagrt.runtime.checks import torch_device
from sagrt.runtime.torch_runners import TorchRunners


class BackendError(SagrtError):
    """Unknown backend, an option it does not take, or one whose requirements are missing here."""


@dataclass
class LoadedModel:
    """What a backend hands the pipeline: runners plus the parts of the model the loop needs besides them."""

    runners: Runners
    tokenizer: object
    scheduler: object
    info: ModelInfo
    safety_checker: object = None
    feature_extractor: object = None


# ---- options, one dataclass per backend ----------------------------------------------------------
@dataclass(frozen=True)
class TorchOptions:
    device: str | None = None  # default: cuda if present, else cpu
    precision: str = "fp32"  # the modules' dtype: fp32, fp16 or bf16


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    device: str | None = None  # cpu, or cuda[:N] for the CUDA/TensorRT providers
    precision: str = "fp32"  # the export's: fp32 or fp16
    providers: str | list[str] | None = None  # tensorrt, cuda, cpu (default: the first installed of those)
    export_dir: str | Path | None = None  # default: sagrt's cache
    opset: int | None = None
    io_binding: bool | None = None


@dataclass(frozen=True)
class TensorRTOptions:
    device: str | None = None  # cuda[:N]
    precision: str | None = None  # the engines' (default: theirs, fp16 when built on first use)
    engine_dir: str | Path | None = None  # from `sagrt build`; default: built on first use
    cuda_graph: bool = True  # one CUDA graph per call shape


@dataclass(frozen=True)
class OpenVINOOptions:
    device: str | None = None  # cpu only
    precision: str = "fp32"  # OpenVINO's inference precision: fp32, or bf16 on CPUs with bfloat16
    export_dir: str | Path | None = None  # the fp32 ONNX export it compiles (default: sagrt's cache)
    opset: int | None = None
    threads: int | None = None  # OpenVINO's inference threads (default: its choice)
    cache: bool = True  # compiled networks kept beside the export
    static_shapes: bool = True  # one compilation per input shapes (faster); False: one dynamic one (less memory)


@dataclass(frozen=True)
class Backend:
    name: str
    options: type
    precisions: tuple[str, ...]
    load: Callable[..., LoadedModel]  # (model, options, sag_layer, safety_checker) -> LoadedModel
    missing: Callable[[], str | None]  # why it cannot run here, None when it can

    def make_options(self, given: dict):
        """The backend's options from keyword arguments, refusing any it does not take."""
        fields = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise BackendError(f"backend {self.name} takes no option {', '.join(unknown)} (it takes "
                               f"{', '.join(fields)})")
        options = self.options(**given)
        if options.precision is not None and options.precision not in self.precisions:
            raise BackendError(f"backend {self.name} runs in {' or '.join(self.precisions)}, not "
                               f"{options.precision!r}")
        return options


def default_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- loaders -------------------------------------------------------------------------------------
def load_torch(model, options: TorchOptions, sag_layer: str, safety_checker: bool) -> LoadedModel:
    components = load_model(model, safety_checker=safety_checker)
    resolve_layer(components.unet, sag_layer)
    device = default_device(options.device)
    runners = TorchRunners(components, sag_layer, device, PRECISIONS[options.precision])
    if components.safety_checker is not None:
        components.safety_checker.to(device)
    return LoadedModel(runners, components.tokenizer, components.scheduler, ModelInfo.of(components, sag_layer),
                       components.safety_checker, components.feature_extractor)


def load_onnxruntime(model, options: OnnxRuntimeOptions, sag_layer: str, safety_checker: bool) -> LoadedModel:
    """Runners over the model's export (made on first use, reused afterwards; a foreign one is refused)."""
    missing = onnxruntime_missing()
    if missing:  # before the export: an install without ONNX Runtime is told so at once
        raise BackendError(f"backend onnxruntime: {missing}")
    from sagrt.engine.onnxruntime_runner import OrtRunners  # imports onnxruntime
    from sagrt.export.onnx_export import DEFAULT_OPSET, export_model

    folder = export_model(model, options.export_dir, opset=options.opset or DEFAULT_OPSET,
                          precision=options.precision, sag_layer=sag_layer)
    providers, device_id = options.providers, 0
    if options.device is not None:
        device = torch.device(options.device)
        providers = ["cpu"] if device.type == "cpu" and providers is None else providers
        device_id = device.index or 0
    runners = OrtRunners(folder, providers, device_id=device_id, io_binding=options.io_binding, model=str(model))
    return saved_parts(folder, model, safety_checker, runners)


def load_tensorrt(model, options: TensorRTOptions, sag_layer: str, safety_checker: bool) -> LoadedModel:
    from sagrt.engine.profiles import BuildConfig
    from sagrt.engine.tensorrt_runner import load_runners

    build = BuildConfig(precision=options.precision or "fp16")
    runners = load_runners(model, device=options.device, sag_layer=sag_layer, engine_dir=options.engine_dir,
                           build=build, cuda_graph=options.cuda_graph)
    built = runners.manifest["build_config"]["precision"]
    if options.precision is not None and built != options.precision:
        raise BackendError(f"the engines in {runners.engine_dir} are {built}, not {options.precision}: ask for "
                           f"{built}, or build {options.precision} engines into another folder")
    return saved_parts(runners.engine_dir, model, safety_checker, runners)


def load_openvino(model, options: OpenVINOOptions, sag_layer: str, safety_checker: bool) -> LoadedModel:
    """OpenVINO runners over the model's fp32 export (made on first use, as for onnxruntime)."""
    missing = openvino_missing()
    if missing:
        raise BackendError(f"backend openvino: {missing}")
    from sagrt.engine.openvino_runner import OvRunners, require_precision  # imports openvino
    from sagrt.export.onnx_export import DEFAULT_OPSET, export_model

    if options.device is not None and torch.device(options.device).type != "cpu":
        raise BackendError(f"backend openvino runs on the CPU, not {options.device}")
    require_precision(options.precision)  # before any export is written
    folder = export_model(model, options.export_dir, opset=options.opset or DEFAULT_OPSET, precision="fp32",
                          sag_layer=sag_layer)
    runners = OvRunners(folder, options.precision, model=str(model), threads=options.threads, cache=options.cache,
                        static_shapes=options.static_shapes)
    return saved_parts(folder, model, safety_checker, runners)


def saved_parts(folder, model, safety_checker: bool, runners: Runners) -> LoadedModel:
    """LoadedModel for runners over an export or engine folder: tokenizer and scheduler saved there, the model
    folder's safety checker run in torch."""
    folder = Path(folder)
    checker = (None, None)
    if safety_checker and str(model) not in PRESETS:
        checker = load_safety_checker(model)
        if checker[0] is not None:
            checker[0].to(runners.device)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return LoadedModel(runners, tokenizer, load_scheduler(folder / "scheduler"), runners.info, *checker)


# ---- what runs here --------------------------------------------------------------------------------
def openvino_missing() -> str | None:
    return None if importlib.util.find_spec("openvino") else 'OpenVINO is not installed: pip install "sagrt[openvino]"'


def tensorrt_missing() -> str | None:
    from sagrt.engine.tensorrt_build import tensorrt_missing as reasons

    found = reasons()
    return "; ".join(found) if found else None


REGISTRY = {backend.name: backend for backend in (
    Backend("torch", TorchOptions, ("fp32", "fp16", "bf16"), load_torch, lambda: None),
    Backend("onnxruntime", OnnxRuntimeOptions, ("fp32", "fp16"), load_onnxruntime, onnxruntime_missing),
    Backend("tensorrt", TensorRTOptions, ("fp16", "fp32"), load_tensorrt, tensorrt_missing),
    Backend("openvino", OpenVINOOptions, ("fp32", "bf16"), load_openvino, openvino_missing),
)}
AUTO_ORDER = ("tensorrt", "onnxruntime", "torch")  # fastest first; auto never lowers precision on its own
BACKEND_NAMES = (*REGISTRY, "auto")


def resolve_backend(name: str) -> Backend:
    """The registry entry of `name`; 'auto' is the first of AUTO_ORDER usable here."""
    if name == "auto":
        return next(REGISTRY[n] for n in AUTO_ORDER if REGISTRY[n].missing() is None)
    if name not in REGISTRY:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    return REGISTRY[name]


def load(model, backend: str = "auto", sag_layer: str = MID_BLOCK_LAYER, safety_checker: bool = True,
         **options) -> LoadedModel:
    """Loads `model` (preset or diffusers folder) on `backend` with that backend's `options`."""
    entry = resolve_backend(backend)
    given = {key: value for key, value in options.items() if value is not None}
    if "device" in given:
        given["device"] = str(torch_device(given["device"]))  # a device that exists here, or one line
    loaded = entry.load(model, entry.make_options(given), sag_layer, safety_checker)
    if loaded.info.sag_layer != sag_layer:
        raise BackendError(f"the {entry.name} artifacts read SAG layer {loaded.info.sag_layer!r}, not "
                           f"{sag_layer!r}: ask for that layer, or export/build for this one")
    return loaded
