"""Request bodies (pydantic) and the one internal form every endpoint maps to, `GenerationParams`.

Static bounds live on the fields (pydantic answers 422 naming the field); bounds that depend on the loaded
model or on the service's options (`--max-size`, `--max-steps`, `--max-images`) are checked by
`check_limits`, which raises `FieldError` with the field's name, answered as the same 422 shape.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sagrt.runtime.schedulers import SchedulerError, canonical_name

MAX_SEED = 2**63 - 1
DEFAULT_STEPS = 20


class FieldError(ValueError):
    """A field outside the service's configured bounds; `loc` names it as pydantic would."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.loc = ("body", field)
        self.message = message


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model accepts: sizes are multiples of `factor`, at least `min_side` pixels."""

    factor: int
    min_side: int
    default_size: int


@dataclass(frozen=True)
class GenerationParams:
    """One request, whatever endpoint it came through. Image i of the request uses seed `seed + i`."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 7.5
    sag_scale: float = 0.75
    seed: int = 0
    n: int = 1
    scheduler: str | None = None  # sagrt name; None: the service's default
    karras_sigmas: bool = False
    sag_threshold: float = 1.0
    sag_blur_sigma: float = 1.0
    sag_blur_kernel: int = 9
    sag_window: tuple[float, float] = (0.0, 1.0)
    return_masks: bool = False

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call: the same shapes, schedule, scheduler, and
        CFG/SAG on or off with the same SAG controls. Prompts, seeds and the two scales may differ."""
        sag_on = self.sag_scale > 0
        controls = (self.sag_threshold, self.sag_blur_sigma, self.sag_blur_kernel, self.sag_window) if sag_on else None
        return (self.width, self.height, self.steps, self.scheduler, self.karras_sigmas, self.guidance_scale > 1.0,
                sag_on, controls)


def random_seed() -> int:
    return random.randrange(0, 2**32)


class SAGFields(BaseModel):
    """SAG's controls and the sampling fields every endpoint shares (defaults: diffusers' values)."""

    sag_scale: float = Field(0.75, ge=0.0, le=20.0, allow_inf_nan=False,
                             description="self-attention guidance scale; 0 turns SAG off")
    sag_threshold: float = Field(1.0, ge=0.0, le=1e4, allow_inf_nan=False,
                                 description="mask positions whose attention score exceeds this")
    sag_blur_sigma: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    sag_blur_kernel: int = Field(9, ge=1, le=63, description="odd Gaussian blur kernel size")
    sag_window: tuple[float, float] = Field((0.0, 1.0), description="[start, end] fractions of the schedule "
                                            "where SAG runs")
    karras_sigmas: bool = False

    @field_validator("sag_blur_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd, got {value}")
        return value

    @field_validator("sag_window")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        start, end = value
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"must satisfy 0 <= start < end <= 1, got {list(value)}")
        return value

    def sag_params(self) -> dict:
        return dict(sag_scale=self.sag_scale, sag_threshold=self.sag_threshold, sag_blur_sigma=self.sag_blur_sigma,
                    sag_blur_kernel=self.sag_blur_kernel, sag_window=tuple(self.sag_window),
                    karras_sigmas=self.karras_sigmas)


class GenerateRequest(SAGFields):
    """Body of the native `POST /v1/generate`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1)
    negative_prompt: str | None = None
    width: int | None = Field(None, ge=8, le=16384, description="pixels (default: the model's size)")
    height: int | None = Field(None, ge=8, le=16384, description="pixels (default: the model's size)")
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1, le=10000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0, allow_inf_nan=False,
                                  description="classifier-free guidance; <= 1 turns CFG off")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="None or -1: random")
    n: int = Field(1, ge=1, le=1000, description="images")
    scheduler: str | None = Field(None, description="sagrt scheduler name (GET /v1/status lists them)")
    return_masks: bool = Field(False, description="event-stream only: each step event carries the SAG mask "
                               "of every image as a PNG at latent resolution")

    def params(self) -> GenerationParams:
        return GenerationParams(prompt=self.prompt, negative_prompt=self.negative_prompt, width=self.width,
                                height=self.height, steps=self.num_inference_steps,
                                guidance_scale=self.guidance_scale, seed=resolve_seed(self.seed), n=self.n,
                                scheduler=self.scheduler, return_masks=self.return_masks, **self.sag_params())


def resolve_seed(seed: int | None) -> int:
    return random_seed() if seed is None or seed < 0 else seed


def check_limits(params: GenerationParams, limits: ModelLimits, config, fields: dict[str, str]) -> GenerationParams:
    """`params` with the model's default size filled in, or FieldError naming the request's field
    (`fields` maps width/height/steps/n/prompt/negative_prompt/scheduler to the endpoint's own names)."""
    from dataclasses import replace

    name = lambda key: fields.get(key, key)  # noqa: E731
    width = params.width or limits.default_size
    height = params.height or limits.default_size
    for key, value, most in (("width", width, config.max_size[0]), ("height", height, config.max_size[1])):
        if value % limits.factor:
            raise FieldError(name(key), f"must be a multiple of {limits.factor}, got {value}")
        if value < limits.min_side:
            raise FieldError(name(key), f"{value} is below this model's minimum of {limits.min_side} pixels")
        if value > most:
            raise FieldError(name(key), f"{value} is above this service's maximum of {most} pixels (--max-size)")
    if params.steps > config.max_steps:
        raise FieldError(name("steps"), f"{params.steps} is above this service's maximum of {config.max_steps} "
                                        f"steps (--max-steps)")
    if params.n > config.max_images:
        raise FieldError(name("n"), f"{params.n} images is above this service's maximum of {config.max_images} "
                                    f"per request (--max-images)")
    for key in ("prompt", "negative_prompt"):
        text = getattr(params, key) or ""
        if len(text) > config.max_prompt_chars:
            raise FieldError(name(key), f"{len(text)} characters is above the maximum of {config.max_prompt_chars}")
    scheduler = params.scheduler or config.scheduler
    if scheduler is not None:
        try:
            scheduler = canonical_name(scheduler)
        except SchedulerError as err:
            raise FieldError(name("scheduler"), str(err)) from None
    return replace(params, width=width, height=height, scheduler=scheduler)
