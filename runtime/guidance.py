"""SAG and classifier-free guidance as plain tensor functions (Hong et al., ICCV 2023).

Shared by every backend: the loop hands these the runner outputs, nothing else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def per_image(scale: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B,) scales -> (B, 1, 1, 1), broadcasting over (B, C, h, w) latents: one guidance scale per image."""
    return scale.to(device=device, dtype=dtype).view(-1, 1, 1, 1)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale) -> torch.Tensor:
    """eps_u + g (eps_c - eps_u) (Ho & Salimans 2022); g a float or (B, 1, 1, 1) per image."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@functools.lru_cache(maxsize=16)
def gaussian_kernel_2d(kernel_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (kernel_size, kernel_size) Gaussian diffusers' SAG pipeline blurs with; made once per setting, not
    every step (on CUDA a fresh one is a host-to-device copy in the middle of the step). Never written to.
    Computed in float32 as diffusers computes it (same rounding), in float64 for float64 latents."""
    half = (kernel_size - 1) * 0.5
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.linspace(-half, half, steps=kernel_size, dtype=exact)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel_1d = (pdf / pdf.sum()).to(device=device, dtype=dtype)
    return torch.mm(kernel_1d[:, None], kernel_1d[None, :])


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect padding, as diffusers' SAG pipeline computes it. Latents too
    small to reflect (a side <= kernel_size // 2, where diffusers crashes) are padded by replication."""
    kernel_2d = gaussian_kernel_2d(kernel_size, float(sigma), img.device, img.dtype)
    kernel_2d = kernel_2d.expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    mode = "reflect" if min(img.shape[-2:]) > pad else "replicate"
    img = F.pad(img, [pad, pad, pad, pad], mode=mode)
    return F.conv2d(img, kernel_2d, groups=img.shape[-3])


def sag_mask(attn_score: torch.Tensor, threshold: float, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """(B, hm, wm) attention score -> (B, 1, h, w) mask of the positions attended more than `threshold`,
    nearest-resized to the latent (SAG eq. 25)."""
    mask = (attn_score > threshold).unsqueeze(1).to(dtype)  # (B, 1, hm, wm)
    return F.interpolate(mask, size)


def sag_degrade(x0: torch.Tensor, mask: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Blur the predicted clean latent where the mask is set, keep it elsewhere (SAG eq. 16)."""
    return gaussian_blur_2d(x0, kernel_size, sigma) * mask + x0 * (1 - mask)
