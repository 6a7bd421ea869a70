"""Scheduler glue: schedulers by name, and SAG's re-noising in each scheduler's own parameterisation.

Schedulers with integer timesteps (DDIM, DDPM, PNDM, DEIS, DPM-Solver, UniPC) work on
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps: x0 and eps come from alphas_cumprod[t] and the
degraded latent is re-noised with `scheduler.add_noise`, exactly as diffusers' SAG pipeline.
Sigma schedulers (Euler, LMS, Heun, KDPM2, EDM; float timesteps) work on x = x0 + sigma eps
with a scaled model input: x0 and eps come from the current sigma, the degraded latent is
x0_deg + sigma eps, then `scale_model_input` (as ComfyUI's SAG node does in x0 space).
"""

from __future__ import annotations

import inspect

import diffusers
import torch

from sagrt.errors import SagrtError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2s": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2-a": "KDPM2AncestralDiscreteScheduler",
    "dpm-sde": "DPMSolverSDEScheduler",
    "edm-euler": "EDMEulerScheduler",
}
ALIASES = {cls.lower(): name for name, cls in SCHEDULERS.items()}
ALIASES.update({"dpmsolver": "dpm++2m", "dpmsolvermultistep": "dpm++2m", "euler_a": "euler-a",
                "euler-ancestral": "euler-a", "kdpm2_a": "kdpm2-a"})
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class SchedulerError(SagrtError):
    """Unknown scheduler name or an option the scheduler does not have."""


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config, karras_sigmas: bool | None = None, prediction_type: str | None = None):
    """A diffusers scheduler by sagrt name (or class name), configured from the model's scheduler config."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise SchedulerError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[key])
    overrides = {}
    if karras_sigmas is not None:
        if "use_karras_sigmas" not in inspect.signature(cls.__init__).parameters:
            raise SchedulerError(f"scheduler {key!r} has no Karras sigmas option")
        overrides["use_karras_sigmas"] = karras_sigmas
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise SchedulerError(f"unknown prediction type {prediction_type!r}: choose {', '.join(PREDICTION_TYPES)}")
        overrides["prediction_type"] = prediction_type
    try:
        return cls.from_config(base_config, **overrides)
    except ImportError as err:  # DPMSolverSDE needs torchsde
        raise SchedulerError(f"scheduler {key!r} needs an extra package: {err}") from err


def uses_sigmas(scheduler) -> bool:
    """True for schedulers whose latents live in sigma space (float timesteps)."""
    return torch.is_floating_point(scheduler.timesteps)


def current_sigma(scheduler) -> torch.Tensor:
    """Noise level of the model input at the current (sub)step, as scale_model_input used it."""
    index = scheduler.step_index
    if getattr(scheduler, "state_in_first_order", True) is False and hasattr(scheduler, "sigmas_interpol"):
        return scheduler.sigmas_interpol[index]  # KDPM2's midpoint call
    return scheduler.sigmas[index]


def predict_x0_eps(scheduler, x: torch.Tensor, model_output: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent x0 and the noise eps that the model output implies for latent x at step t."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise SchedulerError(f"prediction_type {kind!r} must be one of {', '.join(PREDICTION_TYPES)}")
    if uses_sigmas(scheduler):
        sigma = current_sigma(scheduler).to(x.device, x.dtype)
        if hasattr(scheduler, "precondition_outputs"):  # EDM: x0 = c_skip x + c_out F
            x0 = scheduler.precondition_outputs(x, model_output, sigma)
        elif kind == "epsilon":
            x0 = x - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            x0 = model_output
        return x0, (x - x0) / sigma
    # DDIM-style, written as diffusers' SAG pipeline writes it (same operations, same rounding)
    alpha_prod_t = scheduler.alphas_cumprod[t].to(x.device)
    beta_prod_t = 1 - alpha_prod_t
    if kind == "epsilon":
        x0 = (x - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (x - (alpha_prod_t**0.5) * model_output) / (beta_prod_t**0.5)
    else:
        x0 = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * model_output
        eps = (beta_prod_t**0.5) * x + (alpha_prod_t**0.5) * model_output
    return x0, eps


def renoise(scheduler, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Model input for the degraded pass: x0 noised back to the current level with eps."""
    if uses_sigmas(scheduler):
        sigma = current_sigma(scheduler).to(x0.device, x0.dtype)
        return scheduler.scale_model_input(x0 + sigma * eps, t)
    t = t if torch.is_tensor(t) else torch.tensor(t)
    return scheduler.add_noise(x0, noise=eps, timesteps=t[None])
