"""The eager PyTorch reference runner: diffusers modules behind the runner interface (sagrt.runners)."""

from __future__ import annotations

import torch

from sagrt.export.attention import capture_sag_score
from sagrt.export.models import Components, final_layer_norm
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.runners import Runners


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
