"""SAG on the sigma schedulers against references that do not share sagrt's code (float64 CPU, tiny model).

With an empty mask the degraded input of a sigma scheduler is x whatever x0 is, so the empty-mask tests of
test_schedulers.py cannot catch a wrong x0 or a wrong sub-step sigma. Here the mask covers a real part of the
latent and, at every model call of every sigma scheduler, prediction type and sigma schedule:
(a) sagrt's x0 equals the scheduler's own `pred_original_sample` from `step()` (1e-5);
(b) a SAG step written from the definitions (Karras et al. 2022 preconditioning: x0 = c_skip x + c_out F, the
    sigma the model input was scaled for, Gaussian blur under the mask, x0_deg + sigma eps, scaled again)
    gives sagrt's degraded model input and guided output (1e-6);
(c) the blur is scipy.ndimage.gaussian_filter with the same kernel and edge mode, and a higher threshold gives
    a smaller mask.
"""

import importlib.util

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import relative_error
from sagrt.runtime import SAGPipeline
from sagrt.runtime.guidance import gaussian_blur_2d, sag_mask
from sagrt.runtime.pipeline import SAGConfig
from sagrt.runners import ModelInfo, RunnersProxy
from sagrt.runtime.torch_runners import TorchRunners
from sagrt.runtime.schedulers import (PREDICTION_TYPES, SCHEDULERS, UNSUPPORTED_PREDICTIONS, make_scheduler,
                                      predict_x0_eps)

X0_BOUND = 1e-5
REFERENCE_BOUND = 1e-6
GUIDANCE, SAG_SCALE, THRESHOLD = 7.5, 0.75, 1.0
STEPS = 4
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
SIGMA_SCHEDULERS = ("euler", "euler-a", "lms", "heun", "kdpm2", "kdpm2-a", "edm-euler") + (
    ("dpm-sde",) if HAS_TORCHSDE else ())
KARRAS = ("euler", "lms", "heun", "kdpm2", "kdpm2-a", "dpm-sde")  # the ones with a use_karras_sigmas switch


def cases():
    for name in SIGMA_SCHEDULERS:
        for karras in (None, True) if name in KARRAS else (None,):
            for kind in PREDICTION_TYPES:
                if kind not in UNSUPPORTED_PREDICTIONS.get(SCHEDULERS[name], ()):
                    yield pytest.param(name, karras, kind, id=f"{name}{'-karras' if karras else ''}-{kind}")


class CallRecorder(RunnersProxy):
    """Keeps every UNet call's (sample, timestep, context, noise_pred, attn_score)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = []

    def unet(self, sample, timestep, context, cross_attention_kwargs=None):
        noise_pred, score = self.inner.unet(sample, timestep, context, cross_attention_kwargs)
        self.calls.append((sample.clone(), timestep, context.clone(), noise_pred.clone(), score.clone()))
        return noise_pred, score


def record_steps(scheduler):
    """Wraps this scheduler object's `step`: keeps, per model call, the latent x, the model output the loop
    passed, sagrt's x0 for them (taken in the state the loop took it in) and the scheduler's own x0: its
    `pred_original_sample`, or for DPM-Solver and UniPC (whose step returns none) its `convert_model_output`."""
    steps, step = [], scheduler.step

    def recording_step(model_output, t, sample, *args, **kwargs):
        ours, _ = predict_x0_eps(scheduler, sample, model_output, t)
        theirs = None
        if hasattr(scheduler, "convert_model_output"):
            if scheduler.step_index is None:
                scheduler._init_step_index(t)  # what step() does first
            theirs = scheduler.convert_model_output(model_output, sample=sample)
        out = step(model_output, t, sample, *args, **kwargs)
        theirs = out.pred_original_sample if theirs is None else theirs
        steps.append(dict(x=sample.clone(), guided=model_output.clone(), ours=ours, theirs=theirs))
        return out

    scheduler.step = recording_step
    return steps


@pytest.fixture(scope="module")
def tiny64(tiny):
    import copy

    double = copy.deepcopy(tiny)
    for module in (double.text_encoder, double.unet, double.vae):
        module.double()
    return double


_RUNS = {}  # (name, karras, kind) -> sag_run's result: (a) and (b) read the same run


def sag_run(tiny64, name, karras, kind):
    """One SAG run (CFG 7.5, SAG 0.75, threshold 1.0, 4 steps, 64x96): (scheduler, step records, UNet calls)."""
    if (name, karras, kind) not in _RUNS:
        _RUNS[name, karras, kind] = _sag_run(tiny64, name, karras, kind)
    return _RUNS[name, karras, kind]


def _sag_run(tiny64, name, karras, kind):
    scheduler = make_scheduler(name, tiny64.scheduler.config, karras_sigmas=karras, prediction_type=kind)
    steps = record_steps(scheduler)
    runners = CallRecorder(TorchRunners(tiny64, dtype=torch.float64))
    pipe = SAGPipeline(runners, tiny64.tokenizer, scheduler, ModelInfo.of(tiny64))
    pipe.set_progress_bar_config(disable=True)
    pipe("a photo of a cat", negative_prompt="blurry", height=64, width=96, num_inference_steps=STEPS,
         guidance_scale=GUIDANCE, sag_scale=SAG_SCALE, sag=SAGConfig(threshold=THRESHOLD), output_type="latent",
         generator=torch.Generator().manual_seed(3))
    assert len(runners.calls) == 2 * len(steps) == 2 * len(scheduler.timesteps)  # a degraded pass per model call
    return scheduler, steps, runners.calls


# ---- (a) x0 is the scheduler's own ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, karras, kind", cases())
def test_a_x0_is_the_schedulers_pred_original_sample(tiny64, name, karras, kind):
    _, steps, _ = sag_run(tiny64, name, karras, kind)
    for index, record in enumerate(steps):
        assert relative_error(record["ours"], record["theirs"]) <= X0_BOUND, f"model call {index}"


# DPM-Solver++ and UniPC on Karras sigmas: integer timesteps, but x0 from the respaced sigma table (their
# convert_model_output gives x0 for dpmsolver++ and for UniPC's default predict_x0)
@pytest.mark.parametrize("name", ["dpm++2m", "dpm++2s", "unipc"])
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_a_x0_is_the_sigma_table_schedulers_own(tiny64, name, kind):
    _, steps, _ = sag_run(tiny64, name, True, kind)
    for index, record in enumerate(steps):
        assert relative_error(record["ours"], record["theirs"]) <= X0_BOUND, f"model call {index}"


# ---- (b) an independent SAG step -------------------------------------------------------------------------------
def preconditioning(kind, sigma, sigma_data, edm):
    """(c_skip, c_out) with x0 = c_skip x + c_out F (Karras et al. 2022, Table 1). EDM schedulers precondition
    with sigma_data; the others are variance-preserving models seen in sigma space (k-diffusion's wrappers:
    sigma_data 1, eps: x0 = x - sigma eps)."""
    if kind == "sample":
        return 0.0, 1.0
    if not edm and kind == "epsilon":
        return 1.0, -sigma
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, -c_out if kind == "v_prediction" else c_out


def input_scale(model_input, x):
    """The scalar c_in with model_input = c_in x (least squares), checked to be one scalar for the whole latent."""
    c_in = (model_input * x).sum() / (x * x).sum()
    assert relative_error(c_in * x, model_input) <= 1e-12
    return c_in.item()


def nearest_mask(score, threshold, size):
    """(B, hm, wm) score -> (B, 1, h, w) float64 mask, each map cell repeated over its block of the latent."""
    (h, w), (hm, wm) = size, score.shape[-2:]
    assert h % hm == 0 and w % wm == 0
    mask = (score.numpy() > threshold).astype(np.float64)
    return np.repeat(np.repeat(mask, h // hm, axis=-2), w // wm, axis=-1)[:, None]


def blur(x, kernel_size=9, sigma=1.0):
    """Gaussian blur over the last two axes; edges mirrored without repeating the edge sample (torch's reflect)."""
    return gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="mirror", truncate=(kernel_size // 2) / sigma)


@pytest.mark.parametrize("name, karras, kind", cases())
@torch.no_grad()
def test_b_degraded_input_and_guided_output_match_a_float64_reference(tiny64, name, karras, kind):
    scheduler, steps, calls = sag_run(tiny64, name, karras, kind)
    edm = name == "edm-euler"
    sigma_data = scheduler.config.sigma_data if edm else 1.0
    masked = []
    for index, record in enumerate(steps):
        (model_input, t, context, eps, score), (degraded_input, _, _, _, _) = calls[2 * index], calls[2 * index + 1]
        x = record["x"].numpy()
        c_in = input_scale(model_input[:1].numpy(), x)
        if edm:  # the model's noise input is c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1)
            sigma = float(np.exp(4 * float(t)))
            assert abs(c_in * (sigma**2 + sigma_data**2) ** 0.5 - 1) <= 1e-6  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        else:  # the sigma the model input was scaled for: c_in = 1 / sqrt(sigma^2 + 1)
            sigma = (1 / c_in**2 - 1) ** 0.5
        eps_u, eps_c = (half.numpy() for half in eps.chunk(2))
        c_skip, c_out = preconditioning(kind, sigma, sigma_data, edm)
        x0 = c_skip * x + c_out * eps_u
        mask = nearest_mask(score.chunk(2)[0], THRESHOLD, x.shape[-2:])
        masked.append(mask.mean())
        x0_degraded = blur(x0) * mask + x0 * (1 - mask)
        noise = (x - x0) / sigma
        reference_input = c_in * (x0_degraded + sigma * noise)
        assert relative_error(degraded_input, torch.from_numpy(reference_input)) <= REFERENCE_BOUND, \
            f"degraded input, model call {index}"

        uncond_context = context.chunk(2)[0]
        eps_degraded = tiny64.unet(torch.from_numpy(reference_input), t, encoder_hidden_states=uncond_context,
                                   return_dict=False)[0].numpy()
        guided = eps_u + GUIDANCE * (eps_c - eps_u) + SAG_SCALE * (eps_u - eps_degraded)  # SAG eq. 16 after CFG
        assert relative_error(record["guided"], torch.from_numpy(guided)) <= REFERENCE_BOUND, \
            f"guided output, model call {index}"
    # the mask covers a real part of the latent, so the blurred x0 (and with it x0 itself) mattered
    assert 0.1 < np.mean(masked) < 0.9, masked


# ---- (c) blur and threshold ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_size, sigma, shape", [
    (9, 1.0, (2, 4, 8, 12)),  # diffusers' setting on the tiny latent
    (5, 0.7, (1, 4, 7, 5)),  # odd sides
    (9, 2.5, (1, 3, 16, 16)),  # wide blur, kernel cut at 4 samples as diffusers cuts it
    (9, 1.0, (1, 4, 4, 6)),  # a side <= 4 cannot be reflected: edge samples repeated
])
def test_c_blur_is_scipy_gaussian_filter(kernel_size, sigma, shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mode = "mirror" if min(shape[-2:]) > kernel_size // 2 else "nearest"
    expected = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode=mode, truncate=(kernel_size // 2) / sigma)
    ours = gaussian_blur_2d(x, kernel_size, sigma)
    assert ours.shape == x.shape
    assert relative_error(ours, torch.from_numpy(expected)) <= 1e-12
    assert relative_error(ours, x) > 0.1  # it did blur


@torch.no_grad()
def test_c_higher_threshold_gives_a_smaller_mask(tiny):
    sample = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    _, score = TorchRunners(tiny).unet(sample, torch.tensor(500), context)
    thresholds = torch.quantile(score.flatten(), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])).tolist()
    masks = [sag_mask(score, threshold, (8, 12), torch.float32) for threshold in [0.0] + thresholds]
    counts = [int(mask.sum()) for mask in masks]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts), counts
    for larger, smaller in zip(masks, masks[1:]):
        assert torch.all(smaller <= larger)  # every position masked at a higher threshold is masked at a lower one
