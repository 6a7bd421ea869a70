"""`POST /v1/images/generations` in the shape of the OpenAI Images API, so that the official `openai` client
works unchanged: `client.images.generate(prompt=..., n=..., size="WxH", extra_body={"sag_scale": ...})`."""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, field_validator

from sagrt.serve.images import infotext, png_b64
from sagrt.serve.responses import request_id, result_headers
from sagrt.serve.samplers import sampler_label
from sagrt.serve.schemas import DEFAULT_STEPS, MAX_SEED, GenerationParams, SAGFields, resolve_seed
from sagrt.serve.worker import JobError

FIELDS = {"width": "size", "height": "size", "steps": "num_inference_steps"}


class ImageGenerationRequest(SAGFields):
    """OpenAI's fields (fields it has that do not apply, e.g. quality or style, are ignored) plus sagrt's."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="ignored: the service runs one model (GET /v1/status)")
    n: int = Field(1, ge=1, le=1000)
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, or auto (the model's size)")
    response_format: str = Field("b64_json", description="b64_json only: images come back inline")
    negative_prompt: str | None = None
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1, le=10000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    scheduler: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not re.fullmatch(r"\d+x\d+", value):
            raise ValueError(f"must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto, got {value!r}")
        return value

    def params(self) -> GenerationParams:
        width = height = None
        if self.size not in (None, "auto"):
            width, height = (int(part) for part in self.size.split("x"))
        return GenerationParams(prompt=self.prompt, negative_prompt=self.negative_prompt, width=width, height=height,
                                steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                seed=resolve_seed(self.seed), n=self.n, scheduler=self.scheduler, **self.sag_params())


def router(service) -> APIRouter:

    api = APIRouter(tags=["openai"])

    @api.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request):
        """OpenAI Images API: {"created", "data": [{"b64_json", "revised_prompt"}]}."""
        if body.response_format != "b64_json":
            raise JobError(400, f"response_format {body.response_format!r} is not supported: sagrt serve returns "
                                f"images inline, use response_format b64_json")
        params = service.validate(body.params(), FIELDS)
        job = service.submit(params, request_id(request))
        result = await service.wait(job, request)
        sampler = sampler_label(service, params)
        data = [{"b64_json": png_b64(image, infotext(params, seed, service.config.model, sampler)),
                 "revised_prompt": None} for image, seed in zip(result.images, result.seeds)]
        from fastapi.responses import JSONResponse

        return JSONResponse({"created": int(time.time()), "data": data, "seeds": result.seeds},
                            headers=result_headers(result))

    return api
