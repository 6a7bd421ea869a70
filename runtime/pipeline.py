"""The SAG loop, written once for every backend.

API follows diffusers' `StableDiffusionSAGPipeline` so a user switches with one import:

    from sagrt.runtime import SAGPipeline
    pipe = SAGPipeline.from_pretrained("tiny", backend="torch")
    image = pipe("a photo of a cat", sag_scale=0.75).images[0]
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sagrt.errors import SagrtError
from sagrt.export.attention import MID_BLOCK_LAYER
from sagrt.runtime import schedulers as sched
from sagrt.runtime.guidance import classifier_free_guidance, sag_degrade, sag_mask
from sagrt.runtime.runners import ModelInfo, Runners



class InputError(SagrtError):
    """A generation argument out of range."""


@dataclass
class SAGOutput:
    """Same fields as diffusers' StableDiffusionPipelineOutput."""

    images: object
    nsfw_content_detected: list[bool] | None


@dataclass(frozen=True)
class SAGConfig:
    """SAG's own controls; defaults are diffusers' values."""

    threshold: float = 1.0  # mask positions whose attention score exceeds this (eq. 25)
    blur_sigma: float = 1.0
    blur_kernel: int = 9
    window: tuple[float, float] = (0.0, 1.0)  # fractions of the schedule where SAG runs

    def __post_init__(self):
        start, end = self.window
        if not (0.0 <= start < end <= 1.0):
            raise InputError(f"SAG window {start}:{end} must satisfy 0 <= start < end <= 1")
        if not self.blur_sigma > 0:
            raise InputError(f"SAG blur sigma must be positive, got {self.blur_sigma}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise InputError(f"SAG blur kernel size must be a positive odd number, got {self.blur_kernel}")

    def active(self, step: int, num_steps: int) -> bool:
        return self.window[0] <= step / num_steps < self.window[1]


@dataclass
class Timings:
    """Seconds per stage of the last call."""

    text: float = 0.0
    steps: list[float] = field(default_factory=list)
    decode: float = 0.0
    total: float = 0.0


class SAGPipeline:
    """Stable Diffusion with Self-Attention Guidance over any `Runners` backend."""

    def __init__(self, runners: Runners, tokenizer, scheduler, info: ModelInfo, safety_checker=None,
                 feature_extractor=None):
        from diffusers.image_processor import VaeImageProcessor

        self.runners, self.tokenizer, self.scheduler, self.info = runners, tokenizer, scheduler, info
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self.image_processor = VaeImageProcessor(vae_scale_factor=info.vae_scale_factor)
        self.vae_slicing = False
        self.progress_bar_config: dict = {}
        self.timings = Timings()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model="tiny", backend: str = "torch", scheduler: str | None = None,
                        device: str | None = None, torch_dtype: torch.dtype | None = None,
                        safety_checker: bool = True, sag_layer: str = MID_BLOCK_LAYER, **backend_options):
        """`model`: a preset (tiny, small, sd15) or a local diffusers folder. `backend`: torch,
        onnxruntime, tensorrt or auto. `scheduler`: a sagrt scheduler name (default: the model's)."""
        from sagrt.runtime import backends

        runners, tokenizer, base_scheduler, info, checker = backends.load(
            model, backend, device=device, dtype=torch_dtype, safety_checker=safety_checker,
            sag_layer=sag_layer, **backend_options)
        if scheduler is not None:
            base_scheduler = sched.make_scheduler(scheduler, base_scheduler.config)
        return cls(runners, tokenizer, base_scheduler, info, *checker)

    def enable_vae_slicing(self):
        """Decode one image at a time: lower peak memory for large batches."""
        self.vae_slicing = True

    def disable_vae_slicing(self):
        self.vae_slicing = False

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar_config = kwargs

    @property
    def device(self) -> torch.device:
        return self.runners.device

    # ---- prompts ------------------------------------------------------------------------------
    def _tokenize(self, text):
        return self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")

    def _encode(self, text, clip_skip=None):
        tokens = self._tokenize(text)
        kwargs = {}
        if self.info.text_uses_attention_mask:
            kwargs["attention_mask"] = tokens.attention_mask.to(self.device)
        return self.runners.encode_text(tokens.input_ids.to(self.device), clip_skip, **kwargs).to(self.runners.dtype)

    def encode_prompt(self, prompt, num_images_per_prompt, do_cfg, negative_prompt=None, prompt_embeds=None,
                      negative_prompt_embeds=None, clip_skip=None):
        """(prompt_embeds, negative_prompt_embeds), each [batch * images, 77, D], as diffusers builds them.
        As in diffusers, clip_skip applies to the prompt, not the negative prompt."""
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds = self._encode(prompt, clip_skip)
        prompt_embeds = prompt_embeds.to(self.device, self.runners.dtype)
        if do_cfg and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond = [""] * batch
            elif isinstance(negative_prompt, str):
                uncond = [negative_prompt] * batch
            elif len(negative_prompt) != batch:
                raise InputError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch}")
            else:
                uncond = list(negative_prompt)
            negative_prompt_embeds = self._encode(uncond)
        repeat = lambda e: e.repeat_interleave(num_images_per_prompt, dim=0)  # noqa: E731
        negative = repeat(negative_prompt_embeds.to(self.device, self.runners.dtype)) if do_cfg else None
        return repeat(prompt_embeds), negative

    # ---- checks -------------------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, num_inference_steps, callback_steps, negative_prompt,
                     prompt_embeds, negative_prompt_embeds):
        factor, side = self.info.vae_scale_factor, self.info.min_latent_side * self.info.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value % factor:
                raise InputError(f"{name} must be a multiple of {factor}, got {value}")
            if value < side:
                raise InputError(f"{name} {value} is below this model's minimum of {side} pixels")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        if not isinstance(callback_steps, int) or callback_steps <= 0:
            raise InputError(f"callback_steps must be a positive integer, got {callback_steps}")
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise InputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InputError("pass at most one of negative_prompt and negative_prompt_embeds")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise InputError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

    def _step_kwargs(self, generator, eta):
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- the loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 sag_scale=0.75, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback=None, callback_steps=1, cross_attention_kwargs=None, clip_skip=None,
                 sag: SAGConfig | None = None):
        sag = sag or SAGConfig()
        height = height or self.info.sample_size * self.info.vae_scale_factor
        width = width or self.info.sample_size * self.info.vae_scale_factor
        self.check_inputs(prompt, height, width, num_inference_steps, callback_steps, negative_prompt,
                          prompt_embeds, negative_prompt_embeds)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        start = time.perf_counter()
        self.timings = timings = Timings()
        do_cfg = guidance_scale > 1.0
        do_sag = sag_scale > 0.0

        # 1. text embeddings
        prompt_embeds, negative_embeds = self.encode_prompt(prompt, num_images_per_prompt, do_cfg, negative_prompt,
                                                            prompt_embeds, negative_prompt_embeds, clip_skip)
        context = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        # the degraded pass sees the unconditional embeddings (eq. 25), or the prompt's without CFG
        degraded_context = negative_embeds if do_cfg else prompt_embeds
        self._sync()
        timings.text = time.perf_counter() - start

        # 2. timesteps and initial noise
        scheduler = self.scheduler
        try:
            scheduler.set_timesteps(num_inference_steps, device=self.device)
        except ValueError as err:  # e.g. PNDM's Runge-Kutta warm-up needs 4 or more steps
            raise InputError(f"{type(scheduler).__name__} cannot schedule {num_inference_steps} steps ({err}): "
                             f"use another number of steps or another scheduler") from None
        timesteps = scheduler.timesteps
        trained = len(getattr(scheduler, "alphas_cumprod", ()))
        if trained and not torch.is_floating_point(timesteps) and int(timesteps.max()) >= trained:
            # e.g. DDIM with steps_offset 1 at 1000 steps reaches t = 1000; its step() would index past the table
            raise InputError(f"{type(scheduler).__name__} at {num_inference_steps} steps reaches timestep "
                             f"{int(timesteps.max())}, past the model's {trained} training timesteps: use fewer steps")
        shape = (prompt_embeds.shape[0], self.info.in_channels, height // self.info.vae_scale_factor,
                 width // self.info.vae_scale_factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.runners.dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(self.device, self.runners.dtype) * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        if hasattr(scheduler, "noise_sampler_seed") and scheduler.config.get("noise_sampler_seed") is None:
            # DPM-SDE draws its Brownian noise from its own seed, not the generator: tie it to the caller's seed
            scheduler.noise_sampler_seed = generator.initial_seed() if isinstance(generator, torch.Generator) else None
        num_warmup_steps = len(timesteps) - num_inference_steps * scheduler.order

        # 3. denoising with SAG
        bar = tqdm(total=num_inference_steps, **{"desc": "denoise", **self.progress_bar_config})
        try:  # the bar ends its line also when the loop is interrupted (Ctrl-C, an error)
            for i, t in enumerate(timesteps):
                step_start = time.perf_counter()
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                eps, attn_score = self.runners.unet(model_input, t, context, cross_attention_kwargs)
                if do_cfg:
                    eps_ref, eps_cond = eps.chunk(2)
                    attn_score = attn_score.chunk(2)[0]  # SAG reads the unconditional half (eq. 25)
                    eps_guided = classifier_free_guidance(eps_ref, eps_cond, guidance_scale)
                else:
                    eps_ref = eps_guided = eps
                if do_sag and sag.active(i, len(timesteps)):
                    x0, noise = sched.predict_x0_eps(scheduler, latents, eps_ref, t)
                    mask = sag_mask(attn_score, sag.threshold, x0.shape[-2:], x0.dtype)
                    x0_degraded = sag_degrade(x0, mask, sag.blur_kernel, sag.blur_sigma)
                    degraded = sched.renoise(scheduler, x0_degraded, noise, t)
                    eps_degraded, _ = self.runners.unet(degraded, t, degraded_context)
                    eps_guided = eps_guided + sag_scale * (eps_ref - eps_degraded)  # eq. 16
                latents = scheduler.step(eps_guided, t, latents, **step_kwargs).prev_sample
                self._sync()
                timings.steps.append(time.perf_counter() - step_start)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                    bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(scheduler, "order", 1), t, latents)
        finally:
            bar.close()

        # 4. decode, safety check, postprocess
        decode_start = time.perf_counter()
        if output_type == "latent":
            images, nsfw = latents, None
        else:
            scaled = latents / self.info.vae_scaling_factor
            if self.vae_slicing and scaled.shape[0] > 1:
                image = torch.cat([self.runners.decode(one) for one in scaled.split(1)])
            else:
                image = self.runners.decode(scaled)
            image, nsfw = self.run_safety_checker(image)
            denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
            images = self.image_processor.postprocess(image.float(), output_type=output_type,
                                                      do_denormalize=denormalize)
        self._sync()
        timings.decode = time.perf_counter() - decode_start
        timings.total = time.perf_counter() - start
        if not return_dict:
            return images, nsfw
        return SAGOutput(images=images, nsfw_content_detected=nsfw)

    def run_safety_checker(self, image: torch.Tensor):
        """Runs the model folder's safety checker as diffusers does: flagged images come back black."""
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image.float(), output_type="pil")
        checker = self.safety_checker
        clip_input = self.feature_extractor(pil, return_tensors="pt").pixel_values
        param = next(checker.parameters())
        image, nsfw = checker(images=image.to(param.device, param.dtype), clip_input=clip_input.to(param.device,
                                                                                                  param.dtype))
        return image.to(self.device), [bool(flag) for flag in np.atleast_1d(nsfw)]
