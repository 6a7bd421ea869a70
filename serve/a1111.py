"""AUTOMATIC1111 compatibility: its txt2img API (sampler names: serve/samplers.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from sagrt.export.models import model_fingerprint
from sagrt.serve.images import infotext, png_b64
from sagrt.serve.responses import request_id, result_headers
from sagrt.serve.samplers import ALIASES, SAMPLERS, sampler_label, sampler_to_scheduler
from sagrt.serve.schemas import FieldError, GenerationParams, SAGFields, resolve_seed
from sagrt.serve.worker import JobError

FIELDS = {"steps": "steps", "n": "batch_size", "scheduler": "sampler_name", "karras_sigmas": "scheduler"}


class Txt2ImgRequest(SAGFields):
    """A1111's txt2img fields that apply (its many others, e.g. enable_hr or restore_faces, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=10000)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0, allow_inf_nan=False)
    width: int | None = Field(None, ge=8, le=16384)
    height: int | None = Field(None, ge=8, le=16384)
    seed: int = Field(-1, ge=-1, le=2**63 - 1, description="-1: random")
    batch_size: int = Field(1, ge=1, le=1000)
    n_iter: int = Field(1, ge=1, le=1000)
    sampler_name: str | None = Field(None, description="A1111 sampler name, e.g. 'Euler a' or 'DPM++ 2M Karras'")
    sampler_index: str | None = Field(None, description="older A1111 clients send the sampler here")
    scheduler: str | None = Field(None, description="A1111 >= 1.9 schedule type: Karras, Automatic or Uniform")
    send_images: bool = True

    def params(self):

        name = self.sampler_name or self.sampler_index
        scheduler, karras = None, (self.scheduler or "").lower() == "karras"
        if name:
            try:
                scheduler, karras = sampler_to_scheduler(name, self.scheduler)
            except KeyError:
                raise FieldError("sampler_name", f"unknown sampler {name!r}: GET /sdapi/v1/samplers lists them") \
                    from None
        sag = {**self.sag_params(), "karras_sigmas": karras}
        return GenerationParams(prompt=self.prompt, negative_prompt=self.negative_prompt or None, width=self.width,
                                height=self.height, steps=self.steps, guidance_scale=self.cfg_scale,
                                seed=resolve_seed(self.seed), n=self.batch_size * self.n_iter, scheduler=scheduler,
                                **sag)


def router(service) -> APIRouter:
    import json
    import time


    api = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

    @api.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        """A1111 txt2img: {"images": [base64 PNG], "parameters": the request, "info": JSON string with seeds}."""
        params = service.validate(body.params(), FIELDS)
        job = service.submit(params, request_id(request))
        started = time.time()
        try:
            result = await service.wait(job, request)
        except JobError as err:
            if err.status == 409 and job.cancel_reason == "interrupt":
                raise JobError(409, "interrupted by /sdapi/v1/interrupt") from None
            raise
        sampler = sampler_label(service, params)
        texts = [infotext(params, seed, service.config.model, sampler) for seed in result.seeds]
        info = {"prompt": params.prompt, "all_prompts": [params.prompt] * params.n,
                "negative_prompt": params.negative_prompt or "",
                "all_negative_prompts": [params.negative_prompt or ""] * params.n, "seed": result.seeds[0],
                "all_seeds": result.seeds, "subseed": -1, "all_subseeds": [-1] * params.n, "width": params.width,
                "height": params.height, "sampler_name": sampler, "cfg_scale": params.guidance_scale,
                "steps": params.steps, "batch_size": body.batch_size, "sd_model_name": service.config.model,
                "sag_scale": params.sag_scale, "infotexts": texts, "job_timestamp": time.strftime(
                    "%Y%m%d%H%M%S", time.localtime(started)), "clip_skip": 1, "index_of_first_image": 0}
        images = [png_b64(image, text) for image, text in zip(result.images, texts)] if body.send_images else []
        from fastapi.responses import JSONResponse

        return JSONResponse({"images": images, "parameters": body.model_dump(), "info": json.dumps(info)},
                            headers=result_headers(result))

    @api.get("/progress")
    async def progress():
        """A1111's progress of the running job: fraction done, sampling step, jobs waiting."""
        running = list(service.worker.running)
        job = running[0] if running else None
        state = {"skipped": False, "interrupted": bool(job and job.cancel_reason == "interrupt"),
                 "job": job.id if job else "", "job_count": len(service.worker.queue) + len(running),
                 "job_timestamp": "0", "job_no": 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.steps if job else 0}
        eta = 0.0
        if job is not None and job.step and job.started is not None:
            elapsed = time.monotonic() - job.started
            eta = elapsed / max(job.progress, 1e-6) - elapsed
        return {"progress": round(job.progress, 4) if job else 0.0, "eta_relative": round(eta, 3), "state": state,
                "current_image": None, "textinfo": None}

    @api.post("/interrupt")
    async def interrupt():
        """Stops the running job(s) after the current step; they answer 409."""
        return {"interrupted": service.worker.cancel_running("interrupt")}

    @api.get("/samplers")
    async def samplers():
        return [{"name": name, "aliases": ALIASES.get(name, []), "options": {}} for name in SAMPLERS]

    fingerprint: list[str] = []

    @api.get("/sd-models")
    async def sd_models():

        if not fingerprint:  # once: a model folder's fingerprint reads its files
            try:
                fingerprint.append(model_fingerprint(service.config.model))
            except Exception:  # noqa: BLE001 - a listing, not a check
                fingerprint.append("")
        digest, model = fingerprint[0].rsplit("-", 1)[-1], service.config.model  # sagrt's model fingerprint
        short = digest[:10]
        return [{"title": f"{model} [{short}]" if short else model, "model_name": model, "hash": short or None,
                 "sha256": digest if len(digest) == 64 else None, "filename": model, "config": None}]

    @api.get("/options")
    async def options():
        return {"sd_model_checkpoint": service.config.model, "sagrt_backend": service.status()["backend"]}

    return api
