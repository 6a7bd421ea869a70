"""Backend selection: one place that turns (model, backend name) into runners plus what the loop needs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sagrt.errors import SagrtError
from sagrt.export.attention import MID_BLOCK_LAYER, resolve_layer
from sagrt.export.models import load_model
from sagrt.runtime.runners import ModelInfo, TorchRunners

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino", "auto")
ONNXRUNTIME_OPTIONS = ("providers", "export_dir", "opset", "io_binding")


class BackendError(SagrtError):
    """Unknown backend, or one whose requirements are missing here."""


def default_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_auto(backend: str) -> str:
    """'auto' -> the fastest backend usable here: tensorrt (TensorRT and a GPU), else onnxruntime, else torch.
    Any other name is returned as asked."""
    if backend != "auto":
        return backend
    from sagrt.engine.tensorrt_build import tensorrt_missing

    if not tensorrt_missing():
        return "tensorrt"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def load(model, backend: str = "torch", device=None, dtype=None, safety_checker=True, sag_layer=MID_BLOCK_LAYER,
         **options):
    """Returns (runners, tokenizer, scheduler, ModelInfo, (safety_checker, feature_extractor))."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    backend = resolve_auto(backend)
    if backend == "openvino":  # CPU, fp32 or bf16; never picked by auto (sagrt.engine.openvino_runner)
        from sagrt.engine.openvino_runner import load_openvino

        return load_openvino(model, device, dtype, safety_checker, sag_layer, **options)
    if backend == "onnxruntime":
        unknown = sorted(set(options) - set(ONNXRUNTIME_OPTIONS))
        if unknown:
            raise BackendError(f"backend onnxruntime has no options {unknown}: it takes "
                               f"{', '.join(ONNXRUNTIME_OPTIONS)}")
        return load_onnxruntime(model, device, dtype, safety_checker, sag_layer, **options)
    if backend == "tensorrt":
        from sagrt.engine.tensorrt_runner import load_runners

        # precision is the engines' (sagrt build --precision); dtype only concerns the torch backend
        runners = load_runners(model, device=device, sag_layer=sag_layer, **options)
        return (runners, *saved_parts(runners.engine_dir, model, safety_checker, runners))
    if options:
        raise BackendError(f"backend torch takes no options {sorted(options)}")
    components = load_model(model, safety_checker=safety_checker)
    resolve_layer(components.unet, sag_layer)
    device = default_device(device)
    runners = TorchRunners(components, sag_layer, device, dtype or torch.float32)
    if components.safety_checker is not None:
        components.safety_checker.to(device)
    return (runners, components.tokenizer, components.scheduler, ModelInfo.of(components, sag_layer),
            (components.safety_checker, components.feature_extractor))


def load_onnxruntime(model, device=None, dtype=None, safety_checker=True, sag_layer=MID_BLOCK_LAYER, *,
                     providers=None, export_dir=None, opset=None, io_binding=None):
    """ONNX Runtime runners over the model's export (made on first use, reused afterwards); tokenizer,
    scheduler and ModelInfo come from the export folder, a model folder's safety checker runs in torch."""
    from sagrt.engine.onnxruntime_runner import OrtRunners
    from sagrt.export.onnx_export import DEFAULT_OPSET, export_model

    precision = "fp16" if dtype == torch.float16 else "fp32"
    # exported on first use; a matching export is checked and reused (export_model refuses a foreign one)
    folder = export_model(model, export_dir, opset=opset or DEFAULT_OPSET, precision=precision, sag_layer=sag_layer)
    if providers is None and device is not None and torch.device(device).type == "cpu":
        providers = ["cpu"]
    device_id = (torch.device(device).index or 0) if device is not None else 0
    runners = OrtRunners(folder, providers, device_id=device_id, io_binding=io_binding, model=str(model))
    return (runners, *saved_parts(folder, model, safety_checker, runners))


def saved_parts(folder, model, safety_checker: bool, runners):
    """(tokenizer, scheduler, ModelInfo, (safety checker, feature extractor)) for runners over an export or
    engine folder: tokenizer and scheduler saved there, the model folder's safety checker run in torch."""
    from transformers import CLIPTokenizer

    from sagrt.export.models import PRESETS, load_safety_checker, load_scheduler

    folder = Path(folder)
    checker = (None, None)
    if safety_checker and str(model) not in PRESETS:
        checker = load_safety_checker(model)
        if checker[0] is not None:
            checker[0].to(runners.device)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return tokenizer, load_scheduler(folder / "scheduler"), runners.info, checker
