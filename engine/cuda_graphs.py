"""CUDA graph capture of one TensorRT enqueue, with the fallback trtexec uses when capture breaks.

A capture can break for reasons outside sagrt (an engine whose enqueue synchronises, a plugin that
allocates, a driver that refuses an operation while the stream captures). `torch.cuda.graph` then raises
when it ends the capture, so a fallback must sit around the whole capture block, not after it. The capture
runs in thread-local mode (other threads' CUDA calls cannot break it), and a failed one is cleared and
reported; the caller then keeps executing the engine without a graph.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import torch


class CaptureBroken(RuntimeError):
    """The enqueue under capture reported failure (TensorRT's execute_async_v3 returned False)."""


@dataclass
class Capture:
    """A captured graph, or why there is none."""

    graph: object | None
    error: str | None = None


def clear_cuda_error() -> None:
    """Reads off (cudaGetLastError) the error a broken capture leaves in the CUDA runtime torch uses, so the next
    kernel launch does not report it as its own (trtexec does the same). A no-op without CUDA or where that
    runtime library cannot be found by name."""
    if torch.version.cuda is None or not torch.cuda.is_initialized():
        return
    try:  # the library torch already loaded: dlopen by soname returns the same instance
        runtime = ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}")
    except OSError:
        return
    runtime.cudaGetLastError()


def capture_graph(enqueue: Callable[[], bool], stream, *, graph_factory=None, graph_context=None,
                  clear_error: Callable[[], None] = clear_cuda_error) -> Capture:
    """Captures `enqueue()` (which launches work on `stream` and returns False on failure) into a CUDA graph.
    Returns Capture(graph) or Capture(None, reason) after clearing the failure; nothing it launched runs.
    `graph_factory`/`graph_context` default to torch.cuda.CUDAGraph and torch.cuda.graph (tests pass stand-ins)."""
    graph = (graph_factory or torch.cuda.CUDAGraph)()
    context = graph_context or torch.cuda.graph
    try:
        with context(graph, stream=stream, capture_error_mode="thread_local"):
            if not enqueue():
                raise CaptureBroken("the enqueue under capture returned False")
    except RuntimeError as err:  # raised by the enqueue, or by the capture's end when the capture was broken
        clear_error()
        return Capture(None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return Capture(graph)
