"""The runner interface every backend implements (docs/design.md, "The runner interface").

Three calls on the backend's own device tensors:
  encode_text(input_ids [B,77] int64, clip_skip)   -> hidden [B,77,D]
  unet(sample [B,4,h,w], timestep, context [B,77,D]) -> (noise_pred [B,4,h,w], attn_score [B,hm,wm] fp32)
  decode(latents [B,4,h,w], already divided by the VAE scaling factor) -> image [B,3,8h,8w] in [-1,1]

`ModelInfo` is what the loop needs to know of a model; exports and engine folders store it in their manifest,
so runners over them never load torch modules.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from sagrt.networks import MID_BLOCK_LAYER


@dataclass(frozen=True)
class ModelInfo:
    """What the loop needs to know of a model, readable from a manifest without loading torch modules."""

    in_channels: int
    sample_size: int
    vae_scale_factor: int
    vae_scaling_factor: float
    min_latent_side: int
    text_hidden_size: int
    text_layers: int
    text_uses_attention_mask: bool
    sag_layer: str
    fingerprint: str
    source: str
    sag_heads: int = 8  # attention heads of the SAG layer (SD 1.x's); an older manifest lacks the two below
    vae_channels: int = 128  # width of the VAE decoder's full-resolution block (SD's)

    @classmethod
    def of(cls, components, sag_layer: str = MID_BLOCK_LAYER) -> "ModelInfo":
        """From loaded `export.models.Components`."""
        text = components.text_encoder.config
        return cls(
            in_channels=components.unet.config.in_channels,
            sample_size=components.unet.config.sample_size,
            vae_scale_factor=components.vae_scale_factor,
            vae_scaling_factor=float(components.vae.config.scaling_factor),
            min_latent_side=components.min_latent_side,
            text_hidden_size=text.hidden_size,
            text_layers=text.num_hidden_layers,
            text_uses_attention_mask=bool(getattr(text, "use_attention_mask", False)),
            sag_layer=sag_layer,
            fingerprint=components.fingerprint,
            source=components.source,
            sag_heads=int(getattr(components.unet.get_submodule(sag_layer), "heads", 8)),
            vae_channels=int(components.vae.config.block_out_channels[0]),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Runners:
    """Base of every backend: the three calls, plus the device and dtype its tensors live in."""

    name = "base"
    device = torch.device("cpu")
    dtype = torch.float32
    thread_safe = False  # True: two threads may run the three calls at once (see SAGPipeline.__call__)
    # torch threads for the loop's own ops between UNet calls (None: torch's count). CPU engines say 1: torch's
    # OpenMP workers spin for a while after a parallel op and take the cores from the engine's next call.
    host_threads: int | None = None

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
             cross_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Releases sessions, engines and device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RunnersProxy(Runners):
    """Passes the three calls through to `inner`; subclasses observe the calls they need."""

    def __init__(self, inner: Runners):
        self.inner = inner
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.host_threads = inner.host_threads

    def encode_text(self, *args, **kwargs):
        return self.inner.encode_text(*args, **kwargs)

    def unet(self, sample, timestep, context, cross_attention_kwargs=None):
        return self.inner.unet(sample, timestep, context, cross_attention_kwargs)

    def decode(self, latents):
        return self.inner.decode(latents)

    def close(self):
        self.inner.close()


class UNetRecorder(RunnersProxy):
    """Keeps `record(sample, noise_pred, attn_score)` of every UNet call in `calls`, in call order."""

    def __init__(self, inner: Runners, record):
        super().__init__(inner)
        self.record, self.calls = record, []

    def unet(self, sample, timestep, context, cross_attention_kwargs=None):
        noise_pred, attn_score = self.inner.unet(sample, timestep, context, cross_attention_kwargs)
        self.calls.append(self.record(sample, noise_pred, attn_score))
        return noise_pred, attn_score


@contextlib.contextmanager
def capped_torch_threads(limit: int | None):
    """torch's intra-op threads at most `limit` for the block, in the calling thread (None: unchanged). torch's
    OpenMP count is per thread: a pipeline on another thread keeps its own."""
    saved = torch.get_num_threads()
    if limit is None or saved <= limit:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
