"""SAG with every scheduler of diffusers' KarrasDiffusionSchedulers and every prediction type, fp32 CPU, tiny model.

Invariants (1e-5 relative):
(a) sag_scale 0 equals diffusers' StableDiffusionPipeline (plain CFG);
(b) with a mask that is empty (threshold inf) the degraded input and prediction equal the undegraded ones at every
    call and the output equals plain CFG (prediction_type 'sample': 1e-4, see SAMPLE_OUTPUT_BOUND); diffusers' own
    re-noising fails this for sigma schedulers and Karras sigmas;
(c) where diffusers' SAG pipeline accepts the scheduler (integer timesteps), sagrt matches it.
"""

import importlib.util
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers

from conftest import diffusers_pipeline, relative_error
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.runtime import SAGPipeline
from sagrt.runtime.pipeline import SAGConfig
from sagrt.runners import ModelInfo, UNetRecorder
from sagrt.runtime.torch_runners import TorchRunners
from sagrt.runtime.schedulers import (PREDICTION_TYPES, SCHEDULERS, UNSUPPORTED_PREDICTIONS, SchedulerError,
                                      make_scheduler, predict_x0_eps, renoise)

BOUND = 1e-5
STEPS = 4  # PNDM needs at least 4
SIZE = dict(height=64, width=96)
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
# diffusers' SAG pipeline accepts these (integer timesteps); the others it refuses
INTEGER_TIMESTEPS = ("ddim", "ddpm", "pndm", "deis", "dpm++2m", "dpm++2s", "unipc")
# DPM-SDE runs where torchsde is installed; without it, test_dpm_sde_without_torchsde checks the error
AVAILABLE = tuple(name for name in SCHEDULERS if name != "dpm-sde" or HAS_TORCHSDE)
SIGMA_SCHEDULERS = tuple(name for name in AVAILABLE if name not in INTEGER_TIMESTEPS)
TWO_CALLS_PER_STEP = tuple(name for name in ("heun", "kdpm2", "kdpm2-a", "dpm-sde") if name in AVAILABLE)
# (sagrt name, Karras sigmas): every KarrasDiffusionSchedulers member, plus DPM-Solver++ with Karras sigmas
CASES = [(name, None) for name in AVAILABLE] + [("dpm++2m", True)]


def case_id(case):
    name, karras = case
    return name + ("-karras" if karras else "")


def test_every_karras_scheduler_has_a_name():
    assert sorted(SCHEDULERS.values()) == sorted(member.name for member in KarrasDiffusionSchedulers)


def SpyRunners(inner):
    """Keeps each UNet call's (sample, noise_pred)."""
    return UNetRecorder(inner, lambda sample, noise_pred, score: (sample.clone(), noise_pred.clone()))


def scheduler_for(tiny, case, prediction_type):
    name, karras = case
    scheduler = make_scheduler(name, tiny.scheduler.config, karras_sigmas=karras, prediction_type=prediction_type)
    if "noise_sampler_seed" in scheduler.config:  # DPM-SDE's Brownian tree: same noise in both pipelines
        scheduler = type(scheduler).from_config(scheduler.config, noise_sampler_seed=3)
    return scheduler


def sagrt_pipeline(tiny, scheduler):
    pipe = SAGPipeline(SpyRunners(TorchRunners(tiny)), tiny.tokenizer, scheduler, ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    """Batch of 2 images (one prompt, two images), 4 steps, CFG 7.5, latents out."""
    args = dict(prompt="a photo of a cat", negative_prompt="blurry", num_images_per_prompt=2,
                num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(11), **SIZE)
    args.update(kwargs)
    return pipe(**args).images


@contextmanager
def explicit_attention_on_sag_layer(unet):
    """diffusers' explicit attention (AttnProcessor) on the layer SAG reads, as sagrt's torch runner and diffusers'
    SAG pipeline compute it there. With SDPA on that layer the UNet differs by 3.2e-7 relative per call, which
    CFG 7.5 with prediction_type 'sample' amplifies to ~2e-5 on the final latents: other kernels, not other math."""
    layer = unet.get_submodule(MID_BLOCK_LAYER)
    original = layer.processor
    layer.set_processor(AttnProcessor())
    try:
        yield
    finally:
        layer.set_processor(original)


_PLAIN_CFG = {}  # (case, prediction type) -> latents: each reference runs once for (a), (b) and (c)


def plain_cfg(tiny, case, prediction_type):
    """diffusers' StableDiffusionPipeline (plain CFG, no SAG) on the same scheduler and seed."""
    from diffusers import StableDiffusionPipeline

    if (case, prediction_type) not in _PLAIN_CFG:
        with explicit_attention_on_sag_layer(tiny.unet):
            _PLAIN_CFG[case, prediction_type] = run(
                diffusers_pipeline(StableDiffusionPipeline, tiny, scheduler_for(tiny, case, prediction_type)))
    return _PLAIN_CFG[case, prediction_type]


def supported(case, prediction_type):
    return prediction_type not in UNSUPPORTED_PREDICTIONS.get(SCHEDULERS[case[0]], ())


def all_cases():
    return [pytest.param(case, kind, id=f"{case_id(case)}-{kind}") for case in CASES for kind in PREDICTION_TYPES
            if supported(case, kind)]


# ---- (a) sag_scale 0 is plain CFG ---------------------------------------------------------------------------
@pytest.mark.parametrize("case, prediction_type", all_cases())
def test_a_sag_zero_equals_plain_cfg(tiny, case, prediction_type):
    pipe = sagrt_pipeline(tiny, scheduler_for(tiny, case, prediction_type))
    ours = run(pipe, sag_scale=0.0)
    assert ours.shape == (2, 4, 8, 12)
    assert relative_error(ours, plain_cfg(tiny, case, prediction_type)) <= BOUND
    model_calls = len(pipe.scheduler.timesteps)
    assert len(pipe.runners.calls) == model_calls  # no degraded pass when SAG is off


@pytest.mark.parametrize("name, prediction_type", [
    pytest.param(name, kind, id=f"{name}-{kind}")
    for name in SCHEDULERS for kind in PREDICTION_TYPES if not supported((name, None), kind)])
def test_a_unsupported_prediction_type_is_refused(tiny, name, prediction_type):
    """sagrt refuses up front with a one-line SagrtError; diffusers itself fails at the first step."""
    if name == "dpm-sde" and not HAS_TORCHSDE:
        with pytest.raises(SchedulerError, match="needs torchsde, which is not installed: pip install torchsde"):
            make_scheduler(name, tiny.scheduler.config, prediction_type=prediction_type)
        return
    with pytest.raises(SchedulerError, match=rf"does not support prediction_type '{prediction_type}' \(it supports "
                                             r"epsilon, v_prediction\)"):
        make_scheduler(name, tiny.scheduler.config, prediction_type=prediction_type)
    import diffusers
    from diffusers import StableDiffusionPipeline

    scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(tiny.scheduler.config, prediction_type=prediction_type)
    with pytest.raises((NotImplementedError, ValueError), match="(?i)sample"):
        run(diffusers_pipeline(StableDiffusionPipeline, tiny, scheduler))


# ---- (b) an empty mask changes nothing ---------------------------------------------------------------------
# prediction_type 'sample' on the random tiny UNet amplifies rounding: the re-noised input differs from the model
# input by ~4e-8 (x0/eps round trip) and the batch-B degraded pass from the batch-2B one by ~7e-7 (CPU kernels), and
# four CFG-7.5 steps of x0 prediction turn that into 1.0e-5..3.5e-5 on the output (measured, also when both passes
# ran one image at a time). The per-call checks stay at 1e-5 for every prediction type, and the float64 test below
# holds 'sample' at 1e-5 too (measured 1.6e-8 DDIM, ~1e-13 sigma schedulers).
SAMPLE_OUTPUT_BOUND = 1e-4


@pytest.mark.parametrize("case, prediction_type", all_cases())
def test_b_empty_mask_gives_back_the_undegraded_prediction(tiny, case, prediction_type):
    pipe = sagrt_pipeline(tiny, scheduler_for(tiny, case, prediction_type))
    ours = run(pipe, sag_scale=1.0, sag=SAGConfig(threshold=float("inf")))
    calls = pipe.runners.calls
    model_calls = len(pipe.scheduler.timesteps)
    assert len(calls) == 2 * model_calls  # SAG on every model call, also the 2nd call of Heun/KDPM2/DPM-SDE
    for (sample, noise_pred), (degraded_sample, degraded_pred) in zip(calls[::2], calls[1::2]):
        assert sample.shape[0] == 4 and degraded_sample.shape[0] == 2  # CFG batch 2B, degraded pass B
        assert relative_error(degraded_sample, sample[:2]) <= BOUND
        assert relative_error(degraded_pred, noise_pred[:2]) <= BOUND
    bound = SAMPLE_OUTPUT_BOUND if prediction_type == "sample" else BOUND
    assert relative_error(ours, plain_cfg(tiny, case, prediction_type)) <= bound


@pytest.fixture(scope="module")
def tiny64(tiny):
    """The tiny modules in float64: rounding far below any bound, so what remains is the math."""
    import copy

    double = copy.deepcopy(tiny)
    for module in (double.text_encoder, double.unet, double.vae):
        module.double()
    return double


@pytest.mark.parametrize("case, prediction_type", [param for param in all_cases() if param.values[1] == "sample"])
def test_b_empty_mask_is_plain_cfg_for_sample_prediction_in_float64(tiny64, case, prediction_type):
    """The fp32 test above holds 'sample' at 1e-4 only because x0 prediction amplifies kernel rounding; in float64
    the same invariant holds at 1e-5 (diffusers' plain-CFG pipeline runs in float64 too)."""
    from diffusers import StableDiffusionPipeline

    scheduler = scheduler_for(tiny64, case, prediction_type)
    pipe = SAGPipeline(TorchRunners(tiny64, dtype=torch.float64), tiny64.tokenizer, scheduler, ModelInfo.of(tiny64))
    pipe.set_progress_bar_config(disable=True)
    ours = run(pipe, sag_scale=1.0, sag=SAGConfig(threshold=float("inf")))
    reference = run(diffusers_pipeline(StableDiffusionPipeline, tiny64, scheduler_for(tiny64, case, prediction_type)))
    assert ours.dtype == torch.float64
    assert relative_error(ours, reference) <= BOUND
    # and SAG with a real mask does move the result, so the comparison above is not vacuous
    assert relative_error(run(pipe, sag_scale=1.0), reference) > 1e-3


@pytest.mark.parametrize("name", TWO_CALLS_PER_STEP)
def test_two_call_schedulers_get_sag_on_every_call(tiny, name):
    pipe = sagrt_pipeline(tiny, scheduler_for(tiny, (name, None), "epsilon"))
    with_sag = run(pipe, sag_scale=0.75)
    assert len(pipe.scheduler.timesteps) == 2 * STEPS - 1
    assert len(pipe.runners.calls) == 2 * (2 * STEPS - 1)
    # the second call of each step sees a different latent than the first, and its degraded pass follows it
    assert relative_error(pipe.runners.calls[2][0], pipe.runners.calls[0][0]) > 1e-3
    assert relative_error(with_sag, plain_cfg(tiny, (name, None), "epsilon")) > 1e-3


def diffusers_sag_helper(tiny, scheduler):
    from diffusers import StableDiffusionSAGPipeline

    return diffusers_pipeline(StableDiffusionSAGPipeline, tiny, scheduler)


@torch.no_grad()
def state_at(tiny, scheduler, index=1):
    """Latents, scaled model input and eps of model call `index` of a 4-step schedule (plain eps steps before it)."""
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(6))
    runners = TorchRunners(tiny)
    for i, t in enumerate(scheduler.timesteps[:index + 1]):
        model_input = scheduler.scale_model_input(latents, t)
        eps, _ = runners.unet(model_input, t, context)
        if i < index:
            latents = scheduler.step(eps, t, latents).prev_sample
    return t, latents, model_input, eps


@pytest.mark.parametrize("case, index, least_error", [
    (("euler", None), 1, 1e-1), (("lms", None), 1, 1e-1), (("heun", None), 1, 1e-1), (("euler-a", None), 2, 1e-1),
    (("dpm++2m", True), 1, 1e-4)], ids=lambda v: case_id(v) if isinstance(v, tuple) else None)
def test_b_diffusers_renoising_fails_with_an_empty_mask(tiny, case, index, least_error):
    """diffusers' SAG math (pred_x0/pred_epsilon via alphas_cumprod[t], add_noise, no scale_model_input) with an
    empty mask does not give back the undegraded model input; sagrt's re-noising does."""
    scheduler = scheduler_for(tiny, case, "epsilon")
    helper = diffusers_sag_helper(tiny, scheduler)
    t, latents, model_input, eps = state_at(tiny, scheduler, index)
    # Euler-family timesteps are whole numbers stored as floats; alphas_cumprod needs them as integers
    t_index = t.long()
    assert float(t_index) == float(t)
    x0 = helper.pred_x0(latents, eps, t_index)
    empty_attention = torch.zeros(2 * 4, 24, 24)  # (B * heads, T, T) on the 4x6 mid-block map: mask empty
    theirs = helper.sag_masking(x0, empty_attention, (4, 6), t, helper.pred_epsilon(latents, eps, t_index))
    assert relative_error(theirs, model_input) > least_error  # the bound is 1e-5

    x0, noise = predict_x0_eps(scheduler, latents, eps, t)
    assert relative_error(renoise(scheduler, x0, noise, t), model_input) <= BOUND


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_c_diffusers_sag_refuses_sigma_schedulers(tiny, name):
    kind = "epsilon"
    with pytest.raises(ValueError, match="does not support using a scheduler of type"):
        run(diffusers_sag_helper(tiny, scheduler_for(tiny, (name, None), kind)), sag_scale=0.75)


# ---- (c) diffusers' SAG pipeline, where it accepts the scheduler -------------------------------------------------
@pytest.mark.parametrize("name, prediction_type", [
    pytest.param(name, kind, id=f"{name}-{kind}") for name in INTEGER_TIMESTEPS for kind in PREDICTION_TYPES
    if supported((name, None), kind)])
def test_c_matches_diffusers_sag(tiny, name, prediction_type):
    ours = run(sagrt_pipeline(tiny, scheduler_for(tiny, (name, None), prediction_type)), sag_scale=0.75)
    theirs = run(diffusers_sag_helper(tiny, scheduler_for(tiny, (name, None), prediction_type)), sag_scale=0.75)
    assert relative_error(ours, theirs) <= BOUND
    # SAG did something: otherwise this parity would hold trivially
    assert relative_error(ours, plain_cfg(tiny, (name, None), prediction_type)) > 1e-4


# ---- DPM-SDE without torchsde --------------------------------------------------------------------------------
def test_dpm_sde_without_torchsde(tmp_path):
    """With torchsde hidden, the CLI refuses DPM-SDE in one line, exit 2, saying what to install."""
    code = ("import sys; sys.modules['torchsde'] = None\n"
            "from sagrt.runtime.cli import main\n"
            f"sys.exit(main(['generate', 'x', '--scheduler', 'dpm-sde', '--steps', '2', '--height', '64', "
            f"'--width', '64', '--out', {str(tmp_path / 'out')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sagrt")]  # not library warnings
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sagrt generate: error: scheduler 'dpm-sde' needs torchsde, which is not installed: "
                               "pip install torchsde")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_TORCHSDE, reason="DPM-SDE needs torchsde (pip install torchsde; in the test extra)")
def test_dpm_sde_is_reproducible_from_the_seed(tiny):
    pipe = sagrt_pipeline(tiny, make_scheduler("dpm-sde", tiny.scheduler.config))
    first = run(pipe, sag_scale=0.75, generator=torch.Generator().manual_seed(5))
    again = run(pipe, sag_scale=0.75, generator=torch.Generator().manual_seed(5))
    other = run(pipe, sag_scale=0.75, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and relative_error(other, first) > 1e-3
