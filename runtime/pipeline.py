"""The SAG loop, written once for every backend.

API follows diffusers' `StableDiffusionSAGPipeline` so a user switches with one import:

    from sagrt.runtime import SAGPipeline
    pipe = SAGPipeline.from_pretrained("tiny")  # backend="auto": the fastest usable here
    image = pipe("a photo of a cat", sag_scale=0.75).images[0]
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sagrt.errors import SagrtError
from sagrt.locks import exclusive, object_lock
from sagrt.networks import MID_BLOCK_LAYER, precision_name
from sagrt.runtime import backends, checks
from sagrt.runtime import schedulers as sched
from sagrt.runtime.checks import InputError
from sagrt.runtime.guidance import classifier_free_guidance, per_image, sag_degrade, sag_mask
from sagrt.runners import ModelInfo, Runners, capped_torch_threads
from sagrt.runtime.timing import StageClock

logger = logging.getLogger("sagrt")


class PipelineBusyError(SagrtError):
    """A call on a pipeline that is already running one."""


class NonFiniteError(SagrtError):
    """A network or step produced NaN or Inf values; the image would be black or noise."""


def scale_values(name: str, scale) -> list[float]:
    """A guidance scale as a list of finite floats: one number, or one value per image (a list or 1-D tensor)."""
    if isinstance(scale, torch.Tensor) and scale.dim() == 1 or isinstance(scale, (list, tuple)):
        values = [checks.real(name, float(v) if isinstance(v, torch.Tensor) else v) for v in scale]
        if not values:
            raise InputError(f"{name} is empty: pass a number or one value per image")
        return values
    return [checks.real(name, scale)]


def scale_switch(name: str, scale, off_at: float) -> bool:
    """Whether a guidance term runs: `scale > off_at`, for one value or for every image of a per-image list
    (a batch cannot run CFG or SAG for some images only: the UNet batch layout depends on it)."""
    on = [value > off_at for value in scale_values(name, scale)]
    if any(on) != all(on):
        raise InputError(f"{name} values {scale_values(name, scale)} are on both sides of {off_at}: in one call it "
                         f"must be above it for every image or for none")
    return on[0]


def per_image_scale(name: str, scale, batch: int, device, dtype):
    """A number as a float; a list or 1-D tensor of one value per image as [B, 1, 1, 1] (see guidance.per_image)."""
    values = scale_values(name, scale)
    if not isinstance(scale, (list, tuple, torch.Tensor)):
        return values[0]
    if len(values) != batch:
        raise InputError(f"{name} has {len(values)} values: pass a number or one value per image ({batch})")
    return per_image(torch.tensor(values), device, dtype)


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
        if not isinstance(self.window, (tuple, list)) or len(self.window) != 2:
            raise InputError(f"SAG window must be a pair (start, end), got {checks.describe(self.window)}")
        start, end = (checks.real("SAG window", value) for value in self.window)
        if not (0.0 <= start < end <= 1.0):
            raise InputError(f"SAG window {start}:{end} must satisfy 0 <= start < end <= 1")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or self.threshold != self.threshold:  # +-inf are meaningful (mask nothing / everything); NaN is not
            raise InputError(f"SAG threshold must be a number (not NaN), got {checks.describe(self.threshold)}")
        if not checks.real("SAG blur sigma", self.blur_sigma) > 0:
            raise InputError(f"SAG blur sigma must be positive, got {self.blur_sigma}")
        kernel = checks.integer("SAG blur kernel size", self.blur_kernel)
        if kernel < 1 or kernel % 2 == 0:
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

    @classmethod
    def of(cls, durations: list[tuple[str, float]], total: float) -> "Timings":
        """From StageClock durations (text, setup, step..., decode) and the run's wall time."""
        seconds = dict(durations)
        return cls(text=seconds["text"], steps=[s for label, s in durations if label == "step"],
                   decode=seconds["decode"], total=total)


class SAGPipeline:
    """Stable Diffusion with Self-Attention Guidance over any `Runners` backend."""

    def __init__(self, runners: Runners, tokenizer, scheduler, info: ModelInfo, safety_checker=None,
                 feature_extractor=None):
        from diffusers.image_processor import VaeImageProcessor

        self.runners, self.tokenizer, self.scheduler, self.info = runners, tokenizer, scheduler, info
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self.image_processor = VaeImageProcessor(vae_scale_factor=info.vae_scale_factor)
        self.vae_slicing = False
        self.sync_every_step = False  # True: a host sync per step, as before issue 15 (to measure its cost)
        self.progress_bar_config: dict = {}
        self.timings = Timings()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model="tiny", backend: str = "auto", scheduler: str | None = None,
                        torch_dtype: torch.dtype | None = None, safety_checker: bool = True,
                        sag_layer: str = MID_BLOCK_LAYER, **backend_options):
        """`model`: a preset (tiny, small, sd15) or a local diffusers folder. `backend`: auto (the fastest
        usable here), torch (the reference), onnxruntime, tensorrt; `backend_options` are that backend's
        (see runtime/backends.py: device, precision, ...). `torch_dtype` is diffusers' name for `precision`.
        `scheduler`: a sagrt scheduler name (default: the model's)."""
        if torch_dtype is not None:
            named = precision_name(torch_dtype)
            if backend_options.setdefault("precision", named) != named:
                raise InputError(f"torch_dtype {torch_dtype} and precision {backend_options['precision']!r} "
                                 "disagree: pass one of them")
        loaded = backends.load(model, backend, sag_layer=sag_layer, safety_checker=safety_checker,
                               **backend_options)
        base_scheduler = loaded.scheduler
        if scheduler is not None:
            base_scheduler = sched.make_scheduler(scheduler, base_scheduler.config)
        return cls(loaded.runners, loaded.tokenizer, base_scheduler, loaded.info, loaded.safety_checker,
                   loaded.feature_extractor)

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
        with object_lock(self.tokenizer):  # a fast tokenizer's padding state is not thread-safe
            return self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")

    def _warn_truncated(self, text) -> None:
        """Warns, as diffusers does, when a prompt is longer than the text encoder takes: the rest is ignored."""
        limit = self.tokenizer.model_max_length
        with object_lock(self.tokenizer):
            texts = [text] if isinstance(text, str) else list(text)
            ids = self.tokenizer(texts, truncation=False, verbose=False).input_ids
        for one in ids:
            if len(one) > limit:
                dropped = self.tokenizer.decode(one[limit - 1:-1])
                logger.warning(f"sagrt: a prompt is {len(one)} tokens, the text encoder takes {limit}: this part is "
                               f"ignored: {dropped!r}")

    def _encode(self, text, clip_skip=None):
        self._warn_truncated(text)
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
                     prompt_embeds, negative_prompt_embeds, *, guidance_scale=7.5, sag_scale=0.75,
                     num_images_per_prompt=1, eta=0.0, generator=None, latents=None, output_type="pil",
                     callback=None, cross_attention_kwargs=None, clip_skip=None, sag=None):
        """Refuses, with one line in the API's terms, every argument the call cannot use, before any work."""
        self._check_numbers(height, width, num_inference_steps, callback_steps, num_images_per_prompt,
                            guidance_scale, sag_scale, eta, clip_skip)
        batch = self._check_text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        images = batch * num_images_per_prompt
        checks.generators(generator, images)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable, got {checks.describe(callback)}")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise InputError(f"cross_attention_kwargs must be a dict, got {checks.describe(cross_attention_kwargs)}")
        if sag is not None and not isinstance(sag, SAGConfig):
            raise InputError(f"sag must be a SAGConfig, got {checks.describe(sag)}")
        self._check_bounds(height, width, images, scale_switch("guidance_scale", guidance_scale, 1.0), sag)

    def _check_numbers(self, height, width, num_inference_steps, callback_steps, num_images_per_prompt,
                       guidance_scale, sag_scale, eta, clip_skip):
        factor, side = self.info.vae_scale_factor, self.info.min_latent_side * self.info.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            checks.integer(name, value)
            if value <= 0 or value % factor:
                raise InputError(f"{name} must be a positive multiple of {factor}, got {value}")
            if value < side:
                raise InputError(f"{name} {value} is below this model's minimum of {side} pixels")
        max_steps = int(self.scheduler.config.get("num_train_timesteps", 1000))
        checks.integer("num_inference_steps", num_inference_steps, 1, max_steps)
        checks.integer("callback_steps", callback_steps, 1)
        checks.integer("num_images_per_prompt", num_images_per_prompt, 1)
        scale_switch("guidance_scale", guidance_scale, 1.0)
        scale_switch("sag_scale", sag_scale, 0.0)
        checks.real("eta", eta)
        if clip_skip is not None:  # one range on every backend: layer_hidden[-(clip_skip + 1)] must exist
            checks.integer("clip_skip", clip_skip, 0, self.info.text_layers)

    def _check_text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
        """The prompts' batch size, after checking prompts and embeddings."""
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("pass exactly one of prompt and prompt_embeds")
        checks.string_list("prompt", prompt)
        checks.string_list("negative_prompt", negative_prompt)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InputError("pass at most one of negative_prompt and negative_prompt_embeds")
        tokens, text_width = self.tokenizer.model_max_length, self.info.text_hidden_size
        for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if value is not None:
                checks.embeddings(name, value, tokens, text_width)
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise InputError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise InputError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch}")
        return batch

    def _check_bounds(self, height, width, images, do_cfg, sag):
        """Sizes this machine's memory can hold, and a blur no wider than the latent needs (before allocating)."""
        factor = self.info.vae_scale_factor
        latent = (height // factor, width // factor)
        kernel_limit = checks.blur_kernel_limit(*latent)
        if sag is not None and sag.blur_kernel > kernel_limit:
            raise InputError(f"SAG blur kernel size {sag.blur_kernel} is wider than a {latent[0]}x{latent[1]} "
                             f"latent needs: use at most {kernel_limit}")
        checks.check_memory(self.info, self.device, images, height, width, do_cfg)

    def _step_kwargs(self, generator, eta):
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ---- the loop -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Runs one generation: arguments as diffusers' StableDiffusionSAGPipeline, plus `sag` (a SAGConfig) and:
        `guidance_scale` and `sag_scale` may give one value per image (a list or 1-D tensor of the batch's length;
        CFG and SAG must then be on for all images or for none), `generator` may be a list (one per image), and
        `sag_mask_callback(step, mask [B, 1, h, w])` sees the SAG mask of each step where SAG runs. A `callback`
        that raises stops the loop after that step; on CPU engines (onnxruntime, openvino) the loop, callbacks
        included, runs torch at one thread (Runners.host_threads).
        One call at a time: a second call while one runs (another thread, or a callback) raises PipelineBusyError,
        as does a call on a scheduler or (non thread-safe) runners that another pipeline is using."""
        shared = [self, self.scheduler] + ([] if self.runners.thread_safe else [self.runners])
        with exclusive(shared, lambda: PipelineBusyError(
                "this pipeline (or its scheduler or runners) is already running a call: one call at a time; give "
                "each thread its own pipeline (SAGPipeline.from_pretrained) or serialize the calls")):
            return self._call(*args, **kwargs)

    @torch.no_grad()
    def _call(self, prompt=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
              sag_scale=0.75, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
              latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
              return_dict=True, callback=None, callback_steps=1, cross_attention_kwargs=None, clip_skip=None,
              sag: SAGConfig | None = None, sag_mask_callback=None):
        default_side = self.info.sample_size * self.info.vae_scale_factor
        height = default_side if height is None else height
        width = default_side if width is None else width
        self.check_inputs(prompt, height, width, num_inference_steps, callback_steps, negative_prompt,
                          prompt_embeds, negative_prompt_embeds, guidance_scale=guidance_scale,
                          sag_scale=sag_scale, num_images_per_prompt=num_images_per_prompt, eta=eta,
                          generator=generator, latents=latents, output_type=output_type, callback=callback,
                          cross_attention_kwargs=cross_attention_kwargs, clip_skip=clip_skip, sag=sag)
        sag = sag or SAGConfig()
        eta = float(eta)
        start = time.perf_counter()
        clock = StageClock(self.device, self.sync_every_step)  # no host sync per step: one at the end
        clock.mark("start")
        do_cfg = scale_switch("guidance_scale", guidance_scale, 1.0)
        do_sag = scale_switch("sag_scale", sag_scale, 0.0)

        # 1. text embeddings
        prompt_embeds, negative_embeds = self.encode_prompt(prompt, num_images_per_prompt, do_cfg, negative_prompt,
                                                            prompt_embeds, negative_prompt_embeds, clip_skip)
        batch = prompt_embeds.shape[0]
        guidance_scale = per_image_scale("guidance_scale", guidance_scale, batch, self.device, self.runners.dtype)
        sag_scale = per_image_scale("sag_scale", sag_scale, batch, self.device, self.runners.dtype)
        context = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        # the degraded pass sees the unconditional embeddings (eq. 25), or the prompt's without CFG
        degraded_context = negative_embeds if do_cfg else prompt_embeds
        clock.mark("text")

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
        elif not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
            raise InputError("latents must be finite floating-point values")
        latents = latents.to(self.device, self.runners.dtype) * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        if hasattr(scheduler, "noise_sampler_seed") and scheduler.config.get("noise_sampler_seed") is None:
            # DPM-SDE draws its Brownian noise from its own seed, not the generator: tie it to the caller's seed
            # (a list of seeds gives each image its own Brownian tree; a list of one acts as that one generator)
            source = generator[0] if isinstance(generator, list) and len(generator) == 1 else generator
            scheduler.noise_sampler_seed = ([g.initial_seed() for g in source] if isinstance(source, list)
                                            else source.initial_seed() if isinstance(source, torch.Generator)
                                            else None)
        num_warmup_steps = len(timesteps) - num_inference_steps * scheduler.order

        # 3. denoising with SAG
        bar = tqdm(total=num_inference_steps, **{"desc": "denoise", **self.progress_bar_config})
        clock.mark("setup")
        # the bar ends its line also when the loop is interrupted (Ctrl-C, an error); torch runs fewer threads
        # while engines run (Runners.host_threads)
        with bar, capped_torch_threads(self.runners.host_threads):
            for i, t in enumerate(timesteps):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                eps, attn_score = self.runners.unet(model_input, t, context, cross_attention_kwargs)
                if do_cfg:
                    eps_ref, eps_cond = eps.chunk(2)
                    attn_score = attn_score.chunk(2)[0]  # SAG reads the unconditional half (eq. 25)
                    eps_guided = classifier_free_guidance(eps_ref, eps_cond, guidance_scale)
                else:
                    eps_ref = eps_guided = eps
                eps_degraded = None
                if do_sag and sag.active(i, len(timesteps)):
                    x0, noise = sched.predict_x0_eps(scheduler, latents, eps_ref, t)
                    mask = sag_mask(attn_score, sag.threshold, x0.shape[-2:], x0.dtype)
                    if sag_mask_callback is not None:
                        sag_mask_callback(i // getattr(scheduler, "order", 1), mask)
                    x0_degraded = sag_degrade(x0, mask, sag.blur_kernel, sag.blur_sigma)
                    degraded = sched.renoise(scheduler, x0_degraded, noise, t)
                    eps_degraded, _ = self.runners.unet(degraded, t, degraded_context)
                    eps_guided = eps_guided + sag_scale * (eps_ref - eps_degraded)  # eq. 16
                latents = scheduler.step(eps_guided, t, latents, **step_kwargs).prev_sample
                if not bool(torch.isfinite(latents).all()):
                    raise non_finite_error(i, len(timesteps), type(scheduler).__name__, eps=eps, eps_guided=eps_guided,
                                           eps_degraded=eps_degraded)
                clock.mark("step")
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                    bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(scheduler, "order", 1), t, latents)

        # 4. decode, safety check, postprocess
        if output_type == "latent":
            images, nsfw = latents, None
        else:
            scaled = latents / self.info.vae_scaling_factor
            if self.vae_slicing and scaled.shape[0] > 1:
                image = torch.cat([self.runners.decode(one) for one in scaled.split(1)])
            else:
                image = self.runners.decode(scaled)
            if not bool(torch.isfinite(image).all()):
                raise NonFiniteError("the VAE decoder produced NaN or Inf values from finite latents (an fp16 "
                                     "overflow?): decode in fp32 (--dtype fp32 / an fp32 export)")
            image, nsfw = self.run_safety_checker(image)
            denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
            images = self.image_processor.postprocess(image.float(), output_type=output_type,
                                                      do_denormalize=denormalize)
        clock.mark("decode")
        self.timings = Timings.of(clock.durations(), time.perf_counter() - start)
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


def non_finite_error(step: int, steps: int, scheduler: str, eps, eps_guided, eps_degraded) -> NonFiniteError:
    """The error for latents that stopped being finite at `step`, naming the first stage that made NaN or Inf."""
    if not bool(torch.isfinite(eps).all()):
        where = "the UNet's noise prediction"
    elif eps_degraded is not None and not bool(torch.isfinite(eps_degraded).all()):
        where = "the UNet's SAG (degraded) pass"
    elif not bool(torch.isfinite(eps_guided).all()):
        where = "the guidance (guidance_scale or sag_scale too large)"
    else:
        where = f"the {scheduler} step"
    return NonFiniteError(f"step {step + 1} of {steps}: {where} produced NaN or Inf values; no image was made "
                          "(lower guidance_scale/sag_scale, use fp32, or another scheduler)")
