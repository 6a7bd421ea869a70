"""The pipeline as the worker drives it: loaded and warmed once, then one call per batch of job slices."""

from __future__ import annotations

import base64
import io
import os
import threading

import numpy as np

from sagrt.runtime.pipeline import SAGConfig, SAGPipeline
from sagrt.runtime.schedulers import make_scheduler
from sagrt.serve.schemas import GenerationParams, ModelLimits


class Engine:
    """Owns one SAGPipeline; every method but `scheduler_for` and `limits` runs on the engine thread."""

    def __init__(self, config, metrics):
        self.config, self.metrics = config, metrics
        self.pipe = None
        self.limits: ModelLimits | None = None
        self._schedulers: dict = {}
        self._lock = threading.Lock()
        # test hook (docs/serving.md): a request with this seed fails inside the loop, as a failing engine would
        fault = os.environ.get("SAGRT_SERVE_FAULT_SEED")
        self.fault_seed = int(fault) if fault else None

    def load(self):
        pipe = SAGPipeline.from_pretrained(self.config.model, **self.config.pipeline_kwargs())
        pipe.set_progress_bar_config(disable=True)
        info = pipe.info
        self.base_scheduler = pipe.scheduler
        self.limits = ModelLimits(factor=info.vae_scale_factor, min_side=info.min_latent_side * info.vae_scale_factor,
                                  default_size=info.sample_size * info.vae_scale_factor)
        self.pipe = pipe
        if self.config.scheduler is not None:
            self.scheduler_for(self.config.scheduler, False)
        if self.config.warmup:  # one untimed call at the default size, CFG and SAG on
            pipe("warm-up", num_inference_steps=2, output_type="np")

    def scheduler_for(self, name: str | None, karras: bool):
        """A scheduler per (name, karras), made once from the model's config; SchedulerError if it cannot be."""
        key = (name, karras)
        with self._lock:
            if key not in self._schedulers:
                if name is None and not karras:
                    self._schedulers[key] = self.base_scheduler
                else:
                    self._schedulers[key] = make_scheduler(name or type(self.base_scheduler).__name__,
                                                           self.base_scheduler.config, karras_sigmas=karras or None)
            return self._schedulers[key]

    def run(self, slices, on_step):
        """One pipeline call over `slices` [(job, first image, count)]; returns per slice (images, error):
        error is a one-line message when an image came out non-finite (NaN or inf)."""
        import torch

        params: GenerationParams = slices[0][0].params
        prompts, negatives, guidance, sag, generators = [], [], [], [], []
        for job, first, count in slices:
            p = job.params
            prompts += [p.prompt] * count
            negatives += [p.negative_prompt or ""] * count
            guidance += [p.guidance_scale] * count
            sag += [p.sag_scale] * count
            generators += [torch.Generator().manual_seed(seed) for seed in p.seeds[first:first + count]]
        want_masks = any(job.params.return_masks for job, _, _ in slices)
        masks: dict[int, list] = {}

        def on_mask(step, mask):  # (B, 1, h, w) -> per slice, one PNG per image
            if want_masks:
                masks[step] = split_rows(slices, [mask_png(row) for row in mask[:, 0]])

        seeds = [seed for job, first, count in slices for seed in job.params.seeds[first:first + count]]

        def callback(step, t, latents):
            if self.fault_seed is not None and self.fault_seed in seeds:
                raise RuntimeError(f"injected fault for seed {self.fault_seed}")
            on_step(slices, step + 1, masks.pop(step, None))

        self.pipe.scheduler = self.scheduler_for(params.scheduler, params.karras_sigmas)
        try:
            images = self.pipe(prompts, height=params.height, width=params.width, num_inference_steps=params.steps,
                               guidance_scale=guidance, sag_scale=sag, negative_prompt=negatives,
                               generator=generators, output_type="np", callback=callback, sag_mask_callback=on_mask,
                               sag=SAGConfig(threshold=params.sag_threshold, blur_sigma=params.sag_blur_sigma,
                                             blur_kernel=params.sag_blur_kernel, window=params.sag_window)).images
        finally:
            for seconds in self.pipe.timings.steps:  # also the steps of a call stopped early
                self.metrics.step_seconds.observe(seconds)
        outputs = []
        for job_images in split_rows(slices, list(images)):
            if not all(np.isfinite(image).all() for image in job_images):
                outputs.append((None, "the model produced non-finite values (NaN or inf) for this request"))
            else:
                outputs.append(([to_pil(image) for image in job_images], None))
        return outputs


def split_rows(slices, rows: list) -> list[list]:
    """Batch rows -> one list per slice, in slice order."""
    out, start = [], 0
    for _, _, count in slices:
        out.append(rows[start:start + count])
        start += count
    return out


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8))


def mask_png(mask) -> str:
    """A (h, w) 0/1 mask as a base64 grey PNG (255 where SAG blurs)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((mask.float().cpu().numpy() * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
