"""Scheduler glue: schedulers by name, and SAG's re-noising in each scheduler's own parameterisation.

SAG (Hong et al. 2023, eq. 16) needs, at the noise level of the current model call, the clean latent
x0 and the noise eps that the model output implies, and a model input rebuilt from a blurred x0 with
the same eps. Each scheduler family writes its latent differently, so each gets its own x0/eps:

- DDIM, DDPM, PNDM, and DPM-Solver (multistep, singlestep), DEIS, UniPC on their default schedule (integer
  timesteps): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t], re-noised with
  `scheduler.add_noise`: exactly diffusers' SAG pipeline (matched within 1e-5).
- DPM-Solver, DEIS, UniPC with a respaced sigma table (Karras, exponential, beta sigmas, Lu lambdas; still
  integer timesteps): x_t = alpha_t x0 + sigma_t eps with (alpha_t, sigma_t) from the scheduler's own
  `sigmas[step_index]`, as its `step` uses them, for x0, eps and the re-noise alike. Deviation from
  diffusers: its SAG pipeline takes x0 from alphas_cumprod[t] but re-noises with `add_noise`, which reads
  the sigma table; the rounded integer t of a respaced table is not the table's sigma, so even an empty
  mask changes the degraded input (tests/test_schedulers.py shows by how much). sagrt uses
  one (alpha_t, sigma_t), so an empty mask gives back the undegraded input. On the default schedule the
  table and alphas_cumprod agree to rounding and sagrt keeps diffusers' expressions, to match it exactly.
- Euler, Euler ancestral, LMS, Heun, KDPM2, KDPM2 ancestral, DPM-SDE, EDM (float timesteps): x = x0 +
  sigma eps with a scaled model input. x0 comes from the sigma that this (sub)step's
  `scale_model_input` uses (Heun, KDPM2 and DPM-SDE call the model twice per step, at different sigmas),
  the degraded latent is x0_deg + sigma eps, then `scale_model_input`, as ComfyUI's SAG node does in x0
  space. diffusers' SAG pipeline refuses these: it indexes alphas_cumprod by a float timestep and feeds
  the degraded latent to the UNet without scale_model_input.
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
# what each scheduler's `step` refuses in diffusers 0.42 (NotImplementedError / ValueError at the first step)
UNSUPPORTED_PREDICTIONS = {
    "PNDMScheduler": ("sample",),
    "EulerAncestralDiscreteScheduler": ("sample",),
    "KDPM2DiscreteScheduler": ("sample",),
    "KDPM2AncestralDiscreteScheduler": ("sample",),
    "DPMSolverSDEScheduler": ("sample",),
    "EDMEulerScheduler": ("sample",),
}
# config switches that respace the sigma table away from alphas_cumprod at the integer timesteps
RESPACED_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                   "use_flow_sigmas")
# extra packages a scheduler imports, and how to get them
EXTRA_PACKAGES = {"DPMSolverSDEScheduler": "torchsde"}


class SchedulerError(SagrtError):
    """Unknown scheduler name, an option the scheduler does not have, or a missing extra package."""


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def canonical_name(name: str) -> str:
    """sagrt's name for a scheduler given by sagrt name, alias or diffusers class name."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise SchedulerError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, base_config, karras_sigmas: bool | None = None, prediction_type: str | None = None):
    """A diffusers scheduler by sagrt name (or class name), configured from the model's scheduler config."""
    key = canonical_name(name)
    class_name = SCHEDULERS[key]
    cls = getattr(diffusers, class_name)
    overrides = {}
    if karras_sigmas is not None:
        if "use_karras_sigmas" not in inspect.signature(cls.__init__).parameters:
            with_karras = [n for n, c in SCHEDULERS.items()
                           if "use_karras_sigmas" in inspect.signature(getattr(diffusers, c).__init__).parameters]
            raise SchedulerError(f"scheduler {key!r} has no Karras sigmas option: use one of "
                                 f"{', '.join(with_karras)}")
        overrides["use_karras_sigmas"] = karras_sigmas
    if prediction_type is not None:
        overrides["prediction_type"] = prediction_type
    try:
        scheduler = cls.from_config(base_config, **overrides)
    except ImportError as err:  # diffusers' placeholder class when an extra package is missing
        package = EXTRA_PACKAGES.get(class_name, "the package named below")
        raise SchedulerError(f"scheduler {key!r} needs {package}, which is not installed: pip install {package} "
                             f"({str(err).strip().splitlines()[0]})") from err
    check_prediction_type(scheduler)
    return scheduler


def check_prediction_type(scheduler) -> str:
    """The scheduler's prediction type, refused with a one-line reason where its `step` cannot use it."""
    kind = scheduler.config.prediction_type
    name = type(scheduler).__name__
    if kind not in PREDICTION_TYPES:
        raise SchedulerError(f"prediction_type {kind!r} of {name} must be one of {', '.join(PREDICTION_TYPES)}")
    if kind in UNSUPPORTED_PREDICTIONS.get(name, ()):
        usable = [p for p in PREDICTION_TYPES if p not in UNSUPPORTED_PREDICTIONS[name]]
        raise SchedulerError(f"{name} does not support prediction_type {kind!r} (it supports "
                             f"{', '.join(usable)}): choose another scheduler, e.g. euler or ddim")
    return kind


def uses_sigmas(scheduler) -> bool:
    """True for schedulers whose latents live in sigma space, x = x0 + sigma eps (float timesteps)."""
    return torch.is_floating_point(scheduler.timesteps)


def model_input_sigma(scheduler) -> torch.Tensor:
    """Sigma of the latent at the current (sub)step, as the scheduler's own scale_model_input reads it."""
    index = scheduler.step_index
    if getattr(scheduler, "state_in_first_order", True) is False:  # second model call of a 2nd-order step
        if isinstance(scheduler, diffusers.KDPM2AncestralDiscreteScheduler):
            return scheduler.sigmas_interpol[index - 1]
        if isinstance(scheduler, diffusers.KDPM2DiscreteScheduler):
            return scheduler.sigmas_interpol[index]
        if type(scheduler).__name__ == "DPMSolverSDEScheduler":  # the class is a placeholder without torchsde
            return scheduler.mid_point_sigma
    return scheduler.sigmas[index]


def uses_sigma_table(scheduler) -> bool:
    """True for DPM-Solver, DEIS and UniPC on a respaced sigma table (e.g. Karras): x0, eps and the re-noise
    then use the table's (alpha_t, sigma_t) at the current step, as the scheduler's `step` does."""
    return hasattr(scheduler, "_sigma_to_alpha_sigma_t") and any(scheduler.config.get(flag) for flag in RESPACED_SIGMAS)


def alpha_sigma(scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t eps, for schedulers with integer timesteps."""
    if uses_sigma_table(scheduler):
        index = scheduler.step_index
        if index is None:  # before the first step(); step() will resolve the same index
            index = scheduler.index_for_timestep(t)
        return scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[index])
    alpha_prod_t = alphas_cumprod_at(scheduler, t)
    return alpha_prod_t ** (0.5), (1 - alpha_prod_t) ** (0.5)


def scalar_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A schedule scalar in `like`'s dtype, for math with `like`. A 0-d CPU tensor stays on the CPU (torch uses it
    in GPU kernels as a scalar argument), as copying it to the GPU would wait for the device every step."""
    if value.dim() == 0 and value.device.type == "cpu":
        return value.to(like.dtype)
    return value.to(like.device, like.dtype)


def alphas_cumprod_at(scheduler, t) -> torch.Tensor:
    """alphas_cumprod[t] without a host synchronisation for a timestep on the GPU: the table moves to t's device
    once (as diffusers' add_noise moves it) and is read with index_select, where `table[t]` would read t back to
    the host (`item()`) on every step."""
    if not torch.is_tensor(t):
        return scheduler.alphas_cumprod[t]
    if scheduler.alphas_cumprod.device != t.device:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(t.device)
    return scheduler.alphas_cumprod.index_select(0, t.reshape(1).long()).reshape(())


def predict_x0_eps(scheduler, x: torch.Tensor, model_output: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent x0 and the noise eps that the model output implies for latent x at step t."""
    kind = check_prediction_type(scheduler)
    if uses_sigmas(scheduler):
        sigma = scalar_like(model_input_sigma(scheduler), x)
        if hasattr(scheduler, "precondition_outputs"):  # EDM: x0 = c_skip x + c_out F
            x0 = scheduler.precondition_outputs(x, model_output, sigma)
        elif kind == "epsilon":
            x0 = x - sigma * model_output
        elif kind == "v_prediction":  # v on the scaled input x / sqrt(sigma^2 + 1)
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            x0 = model_output
        return x0, (x - x0) / sigma
    # written as diffusers' SAG pipeline writes it (same operations, same rounding)
    alpha, sigma = (scalar_like(value, x) for value in alpha_sigma(scheduler, t))
    if kind == "epsilon":
        x0 = (x - sigma * model_output) / alpha
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (x - alpha * model_output) / sigma
    else:  # v = alpha eps - sigma x0
        x0 = alpha * x - sigma * model_output
        eps = sigma * x + alpha * model_output
    return x0, eps


def renoise(scheduler, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Model input for the degraded pass: x0 noised back to the current level with eps."""
    if uses_sigmas(scheduler):
        sigma = scalar_like(model_input_sigma(scheduler), x0)
        return scheduler.scale_model_input(x0 + sigma * eps, t)
    if uses_sigma_table(scheduler):
        alpha, sigma = (scalar_like(value, x0) for value in alpha_sigma(scheduler, t))
        return scheduler.scale_model_input(alpha * x0 + sigma * eps, t)
    t = t if torch.is_tensor(t) else torch.tensor(t)
    return scheduler.add_noise(x0, noise=eps, timesteps=t[None])
