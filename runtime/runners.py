"""The runner interface every backend implements, and the eager PyTorch reference runner.

Three calls on the backend's own device tensors:
  encode_text(input_ids [B,77] int64, clip_skip)   -> hidden [B,77,D]
  unet(sample [B,4,h,w], timestep, context [B,77,D]) -> (noise_pred [B,4,h,w], attn_score [B,hm,wm] fp32)
  decode(latents [B,4,h,w], already divided by the VAE scaling factor) -> image [B,3,8h,8w] in [-1,1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sagrt.export.attention import MID_BLOCK_LAYER, capture_sag_score
from sagrt.export.models import Components, final_layer_norm


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
    def of(cls, components: Components, sag_layer: str = MID_BLOCK_LAYER) -> "ModelInfo":
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


class TorchRunners(Runners):
    """Eager diffusers modules: the numerical reference every other backend is checked against."""

    name = "torch"
    thread_safe = True  # the SAG capture holds the UNet's lock; the modules keep no other state

    def __init__(self, components: Components, sag_layer: str = MID_BLOCK_LAYER,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.text_encoder, self.unet_model, self.vae = (
            module.to(self.device) if module.dtype == dtype else module.to(self.device, dtype)
            for module in (components.text_encoder, components.unet, components.vae))
        self.sag_layer = sag_layer

    def encode_text(self, input_ids, clip_skip=None, attention_mask=None):
        input_ids = input_ids.to(self.device)
        if clip_skip is None:
            return self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return final_layer_norm(self.text_encoder)(out[-1][-(clip_skip + 1)])

    def unet(self, sample, timestep, context, cross_attention_kwargs=None):
        with capture_sag_score(self.unet_model, self.sag_layer) as capture:
            noise_pred = self.unet_model(sample, timestep, encoder_hidden_states=context,
                                         cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
        return noise_pred, capture.score_map()

    def decode(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]
