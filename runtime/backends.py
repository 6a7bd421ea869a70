"""Backend selection: one place that turns (model, backend name) into runners plus what the loop needs."""

from __future__ import annotations

import torch

from sagrt.errors import SagrtError
from sagrt.export.attention import MID_BLOCK_LAYER, resolve_layer
from sagrt.export.models import load_model
from sagrt.runtime.runners import ModelInfo, TorchRunners

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


class BackendError(SagrtError):
    """Unknown backend, or one whose requirements are missing here."""


def default_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_backend(backend: str) -> str:
    """auto -> tensorrt when TensorRT and a GPU are usable here, else onnxruntime."""
    if backend != "auto":
        return backend
    from sagrt.engine.tensorrt_build import tensorrt_missing

    return "onnxruntime" if tensorrt_missing() else "tensorrt"


def load(model, backend: str = "torch", device=None, dtype=None, safety_checker=True, sag_layer=MID_BLOCK_LAYER,
         **options):
    """Returns (runners, tokenizer, scheduler, ModelInfo, (safety_checker, feature_extractor))."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    backend = resolve_backend(backend)
    if backend == "tensorrt":
        from sagrt.engine.tensorrt_runner import load_backend

        # precision is the engines' (sagrt build --precision); dtype only concerns the torch backend
        return load_backend(model, device=device, safety_checker=safety_checker, sag_layer=sag_layer, **options)
    if backend != "torch":
        raise BackendError(f"backend {backend!r} is not available in this build")
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
