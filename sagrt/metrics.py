"""The two numbers every parity check reports."""

from __future__ import annotations

import math

import torch


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64 (tensors or arrays)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def psnr_db(image, reference) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]; inf when they are identical."""
    mse = (torch.as_tensor(image).double() - torch.as_tensor(reference).double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
