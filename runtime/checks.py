"""Checks of a generation's arguments, in the API's terms: types, finite values, and bounds derived from the
model and this machine's memory. Each failure is one InputError line that says what to change."""

from __future__ import annotations

import math
import numbers
import os

import torch

from sagrt.errors import SagrtError

# Copies of the largest tensor alive at once, counted from the code paths they stand for (see memory_estimate):
# the SAG layer materialises its attention scores and their softmax ([B, heads, T, T] twice, then a head mean);
# the VAE decoder keeps a few full-resolution activations of its first block's width alive at once.
SAG_ATTENTION_COPIES = 2.5
VAE_ACTIVATION_COPIES = 6


class InputError(SagrtError):
    """A generation argument out of range."""


def describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (list, tuple)) else type(value).__name__


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int within [low, high]; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {describe(value)}")
    value = int(value)
    if low is not None and value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{name} must be <= {high}, got {value}")
    return value


def real(name: str, value) -> float:
    """`value` as a finite float (NaN and infinities silently turn guidance off or give black images)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return value


def string_list(name: str, value, allow_none: bool = True) -> None:
    """None, a string, or a non-empty list of strings."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {describe(value)}")
    wrong = next((item for item in value if not isinstance(item, str)), None)
    if wrong is not None:
        raise InputError(f"{name} must be a string or a list of strings, got a list holding {describe(wrong)}")


def embeddings(name: str, value, tokens: int, width: int) -> None:
    """A [batch, tokens, width] float tensor."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor [batch, {tokens}, {width}], got {type(value).__name__}")
    if value.ndim != 3 or value.shape[0] < 1 or tuple(value.shape[1:]) != (tokens, width):
        raise InputError(f"{name} must have shape [batch, {tokens}, {width}] for this model, got "
                         f"{list(value.shape)}")
    if not value.is_floating_point():
        raise InputError(f"{name} must hold floating-point values, got {value.dtype}")


def generators(value, count: int) -> None:
    """None, one torch.Generator, or a list of `count` of them (one per image)."""
    if value is None or isinstance(value, torch.Generator):
        return
    if isinstance(value, list) and all(isinstance(item, torch.Generator) for item in value):
        if len(value) != count:
            raise InputError(f"generator is a list of {len(value)} generators but the call makes {count} images: "
                             f"pass one per image, or a single generator")
        return
    raise InputError(f"generator must be a torch.Generator or a list of them, got {describe(value)} (for a seed, "
                     f"pass torch.Generator().manual_seed(seed))")


def memory_bytes(device: torch.device) -> int | None:
    """Memory a call may use on `device`: free memory of a CUDA device, available RAM on the host (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sag_downsamplings(info) -> int:
    """How many stride-2 levels below the latent the SAG layer's map lies, from its name and the UNet's depth."""
    levels = max(1, int(info.min_latent_side).bit_length())  # min_latent_side = 2 ** (levels - 1)
    parts = info.sag_layer.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return max(0, levels - 1 - int(parts[1]))
    return levels - 1  # mid_block


def memory_estimate(info, images: int, height: int, width: int, do_cfg: bool) -> tuple[int, str]:
    """(bytes, what needs them) for the largest allocation of one call: the SAG layer's attention maps or the VAE
    decoder's full-resolution activations. A floor, not a budget: the call needs at least this much."""
    factor = info.vae_scale_factor
    k = sag_downsamplings(info)
    tokens = math.ceil(height / factor / 2**k) * math.ceil(width / factor / 2**k)
    batch = images * (2 if do_cfg else 1)
    attention = SAG_ATTENTION_COPIES * batch * info.sag_heads * tokens**2 * 4
    vae = VAE_ACTIVATION_COPIES * images * height * width * info.vae_channels * 4
    return (int(attention), "the SAG layer's attention maps") if attention > vae else (int(vae), "the VAE decoder")


def check_memory(info, device, images: int, height: int, width: int, do_cfg: bool) -> None:
    needed, what = memory_estimate(info, images, height, width, do_cfg)
    available = memory_bytes(torch.device(device))
    if available is not None and needed > available:
        raise InputError(f"{height}x{width} pixels x {images} image(s) needs at least {needed / 2**30:.1f} GiB for "
                         f"{what}, more than the {available / 2**30:.1f} GiB available on {device}: use a smaller "
                         f"height/width or fewer images")


def blur_kernel_limit(latent_height: int, latent_width: int) -> int:
    """The widest SAG blur that still means something on this latent: one that spans it from any position."""
    return max(9, 2 * max(latent_height, latent_width) + 1)


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def seeded_generator(seed, device="cpu") -> torch.Generator:
    """A torch.Generator seeded with `seed` (an integer in SEED_RANGE)."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not low <= seed <= high:
        raise InputError(f"seed must be an integer from {low} to {high}, got {seed!r}")
    return torch.Generator(device).manual_seed(int(seed))


def torch_device(device) -> torch.device:
    """`device` (a name such as cpu, cuda, cuda:1) as a torch.device that exists here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r} asks for CUDA, which is not available here: use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"device {device!r} does not exist: this machine has CUDA devices 0 to {count - 1}")
    elif parsed.type != "cpu":
        available = getattr(getattr(torch.backends, parsed.type, None), "is_available", lambda: False)()
        if not available:
            raise InputError(f"device {device!r} is not available here: use cpu or cuda")
    return parsed


def check_run_settings(seed, guidance_scale, sag_scale) -> None:
    """What a command checks before it starts worker processes or loads a model: the seed and finite scales."""
    seeded_generator(seed)
    real("guidance_scale", guidance_scale)
    real("sag_scale", sag_scale)
