"""The torch backend against diffusers' own pipelines: fp32 CPU, same generator, 1e-5 relative."""


import pytest
import torch

from conftest import diffusers_pipeline, relative_error
from sagrt.runtime import SAGPipeline
from sagrt.runners import ModelInfo
from sagrt.runtime.torch_runners import TorchRunners
from sagrt.runtime.schedulers import make_scheduler

BOUND = 1e-5
PROMPTS = ["a photo of a cat", "a painting of a horse"]


def sagrt_pipeline(tiny, scheduler):
    pipe = SAGPipeline(TorchRunners(tiny), tiny.tokenizer, scheduler, ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", "low quality"], num_images_per_prompt=2,
                num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(7))
    args.update(kwargs)
    return pipe(**args).images


@pytest.mark.parametrize("size", [(64, 96), (72, 72)])
@pytest.mark.parametrize("sag_scale", [0.0, 0.75, 1.0])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpm++2m", "unipc"])
def test_matches_diffusers_sag(tiny, scheduler, guidance, sag_scale, size):
    from diffusers import StableDiffusionSAGPipeline

    height, width = size
    kwargs = dict(guidance_scale=guidance, sag_scale=sag_scale, height=height, width=width)
    ours = run(sagrt_pipeline(tiny, make_scheduler(scheduler, tiny.scheduler.config)), **kwargs)
    theirs = run(diffusers_pipeline(StableDiffusionSAGPipeline, tiny, make_scheduler(scheduler, tiny.scheduler.config)),
                 **kwargs)
    assert ours.shape == (4, 4, height // 8, width // 8)
    assert relative_error(ours, theirs) <= BOUND


def test_sag_changes_the_result(tiny):
    """The parity above would hold trivially if SAG did nothing: it must move the latents."""
    scheduler = make_scheduler("ddim", tiny.scheduler.config)
    with_sag = run(sagrt_pipeline(tiny, scheduler), sag_scale=1.0, height=64, width=96)
    without = run(sagrt_pipeline(tiny, scheduler), sag_scale=0.0, height=64, width=96)
    assert relative_error(with_sag, without) > 1e-3
