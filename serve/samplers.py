"""AUTOMATIC1111's sampler names <-> sagrt schedulers (and Karras sigmas), for its API, the responses' infotext
and the page."""

from __future__ import annotations

from sagrt.runtime.schedulers import SchedulerError, canonical_name

# A1111 sampler name -> (sagrt scheduler, Karras sigmas). Names as A1111's /sdapi/v1/samplers lists them.
SAMPLERS = {
    "Euler a": ("euler-a", False),
    "Euler": ("euler", False),
    "LMS": ("lms", False),
    "LMS Karras": ("lms", True),
    "Heun": ("heun", False),
    "DPM2": ("kdpm2", False),
    "DPM2 Karras": ("kdpm2", True),
    "DPM2 a": ("kdpm2-a", False),
    "DPM2 a Karras": ("kdpm2-a", True),
    "DPM++ 2M": ("dpm++2m", False),
    "DPM++ 2M Karras": ("dpm++2m", True),
    "DPM++ SDE": ("dpm-sde", False),
    "DPM++ SDE Karras": ("dpm-sde", True),
    "DDIM": ("ddim", False),
    "PLMS": ("pndm", False),
    "UniPC": ("unipc", False),
    "DDPM": ("ddpm", False),
    "DEIS": ("deis", False),
}
# A1111's k-diffusion aliases of the same samplers
ALIASES = {"Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"],
           "LMS Karras": ["k_lms_ka"], "Heun": ["k_heun"], "DPM2": ["k_dpm_2"], "DPM2 Karras": ["k_dpm_2_ka"],
           "DPM2 a": ["k_dpm_2_a"], "DPM2 a Karras": ["k_dpm_2_a_ka"], "DPM++ 2M": ["k_dpmpp_2m"],
           "DPM++ 2M Karras": ["k_dpmpp_2m_ka"], "DPM++ SDE": ["k_dpmpp_sde"],
           "DPM++ SDE Karras": ["k_dpmpp_sde_ka"], "DDIM": [], "PLMS": [], "UniPC": [], "DDPM": [], "DEIS": []}
CLASS_NAMES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
               "EulerAncestralDiscreteScheduler": "euler-a", "DPMSolverMultistepScheduler": "dpm++2m"}


def sampler_to_scheduler(name: str, schedule: str | None = None) -> tuple[str, bool]:
    """A1111 sampler name (or alias, or a sagrt scheduler name) and optional schedule type ("Karras",
    "Automatic", "Uniform"; A1111 >= 1.9 sends it apart) -> (sagrt scheduler, Karras sigmas). KeyError if unknown."""
    karras = (schedule or "").strip().lower() == "karras"
    folded = {key.lower(): key for key in SAMPLERS}
    folded.update({alias: key for key, aliases in ALIASES.items() for alias in aliases})
    key = folded.get(name.strip().lower())
    if key is not None:
        scheduler, key_karras = SAMPLERS[key]
        return scheduler, key_karras or karras
    try:
        return canonical_name(name), karras
    except SchedulerError:
        raise KeyError(name) from None


def a1111_name(scheduler: str, karras: bool) -> str:
    """sagrt scheduler (or diffusers class name) -> the A1111 sampler name it serves as, else the name itself."""
    scheduler = CLASS_NAMES.get(scheduler, scheduler)
    for name, (target, target_karras) in SAMPLERS.items():
        if target == scheduler and target_karras == karras:
            return name
    return scheduler + (" Karras" if karras else "")


# ---- the txt2img API ------------------------------------------------------------------------------------------
# GenerationParams field -> A1111's request field, for 422 messages (n = batch_size x n_iter)


def sampler_label(service, params) -> str:
    """The A1111 sampler name a request runs as (its scheduler, or the service's default)."""
    return a1111_name(params.scheduler or service.default_scheduler(), params.karras_sigmas)
