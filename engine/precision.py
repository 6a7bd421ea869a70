"""How far a backend's networks are from a reference's, call by call: the fp16 check of an export or engine
against fp32 torch. Both sides are `Runners`, so the same report serves ONNX Runtime on the CPU (tests) and
TensorRT on a GPU (benchmarks/gpu_check.py).

Per network: relative error ||a - b|| / ||b||, NaN/Inf counts of the candidate; for the UNet also the
fraction of SAG mask positions (score > threshold) that agree; for the VAE the image PSNR, the measure of
docs/design.md's fp16 bound (>= 30 dB).
"""

from __future__ import annotations

import torch

from sagrt.metrics import psnr_db, relative_error

PSNR_BOUND_DB = 30.0  # docs/design.md: fp16 engines, image PSNR against the reference


def finite_counts(tensor: torch.Tensor) -> dict[str, int]:
    return {"nan": int(torch.isnan(tensor).sum()), "inf": int(torch.isinf(tensor).sum())}


def mask_agreement(score: torch.Tensor, reference: torch.Tensor, threshold: float = 1.0) -> float:
    """Fraction of SAG mask positions (score > threshold) on which two attention scores agree."""
    return float(((score > threshold) == (reference > threshold)).float().mean())


def network_inputs(info, height: int, width: int, batch: int, seed: int, device) -> dict[str, torch.Tensor]:
    """Seeded inputs of real scale for the three networks (latent size from the image size)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = height // info.vae_scale_factor, width // info.vae_scale_factor
    return {
        "input_ids": torch.randint(0, 500, (batch, 77), generator=gen),  # ids of the tiny vocabulary and up
        "sample": torch.randn(batch, info.in_channels, h, w, generator=gen).to(device),
        "latents": (torch.randn(batch, info.in_channels, h, w, generator=gen) / info.vae_scaling_factor).to(device),
    }


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().cpu()


@torch.no_grad()
def compare_networks(candidate, reference, info, height: int, width: int, batch: int = 1, seed: int = 0,
                     timesteps: tuple[int, ...] = (900, 500, 100), threshold: float = 1.0) -> dict:
    """Errors of `candidate`'s three calls against `reference`'s, on the same inputs (the UNet at B and 2B
    for each timestep, with the reference text encoder's embeddings as context)."""
    inputs = network_inputs(info, height, width, batch, seed, reference.device)
    report: dict = {}
    ids = inputs["input_ids"]
    hidden_ref = reference.encode_text(ids.to(reference.device))
    hidden = candidate.encode_text(ids.to(candidate.device))
    report["text_encoder"] = {"relative_error": relative_error(_cpu(hidden), _cpu(hidden_ref)), **finite_counts(hidden)}

    unet = []
    for t in timesteps:
        for copies in (1, 2):  # B (SAG's degraded pass) and 2B (the CFG pass)
            sample = torch.cat([inputs["sample"]] * copies)
            context = torch.cat([hidden_ref] * copies)
            step = torch.tensor(t, device=reference.device)
            noise_ref, score_ref = reference.unet(sample, step, context)
            noise, score = candidate.unet(sample.to(candidate.device, candidate.dtype), step.to(candidate.device),
                                          context.to(candidate.device, candidate.dtype))
            unet.append({"t": t, "batch": sample.shape[0], "score_dtype": str(score.dtype).removeprefix("torch."),
                         "noise_pred": relative_error(_cpu(noise), _cpu(noise_ref)),
                         "attn_score": relative_error(_cpu(score), _cpu(score_ref)),
                         "mask_agreement": mask_agreement(_cpu(score), _cpu(score_ref), threshold),
                         **finite_counts(noise)})
    report["unet"] = {"calls": unet, "worst_noise_pred": max(c["noise_pred"] for c in unet),
                      "worst_attn_score": max(c["attn_score"] for c in unet),
                      "lowest_mask_agreement": min(c["mask_agreement"] for c in unet),
                      "nan": sum(c["nan"] for c in unet), "inf": sum(c["inf"] for c in unet)}

    image_ref = reference.decode(inputs["latents"])
    image = candidate.decode(inputs["latents"].to(candidate.device, candidate.dtype))
    to_unit = lambda x: (_cpu(x) / 2 + 0.5).clamp(0, 1).numpy()  # noqa: E731  [-1, 1] -> [0, 1] as postprocess
    psnr = psnr_db(to_unit(image), to_unit(image_ref))
    report["vae_decoder"] = {"relative_error": relative_error(_cpu(image), _cpu(image_ref)), "psnr_db": psnr,
                             "bound_db": PSNR_BOUND_DB, "passed": psnr >= PSNR_BOUND_DB, **finite_counts(image)}
    return report
