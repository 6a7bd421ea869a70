"""The SAG loop's API surface on the torch backend: inputs, outputs, model folders, safety checker."""

import warnings

import numpy as np
import pytest
import torch

from conftest import relative_error
from sagrt.export.attention import MID_BLOCK_LAYER, SAGLayerError, capture_sag_score
from sagrt.export.models import ModelError, load_model
from sagrt.runtime import SAGPipeline
from sagrt.runtime.pipeline import InputError
from sagrt.runners import ModelInfo
from sagrt.runtime.torch_runners import TorchRunners


@pytest.fixture
def pipe(tiny):
    pipe = SAGPipeline(TorchRunners(tiny), tiny.tokenizer, tiny.scheduler, ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(pipe, **kwargs):
    args = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, generator=gen())
    args.update(kwargs)
    return pipe(**args)


def save_tiny_folder(tiny, path, safety_checker=None, feature_extractor=None):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=safety_checker,
                                feature_extractor=feature_extractor, requires_safety_checker=False).save_pretrained(path)
    return path


def tiny_safety_checker(flag_everything: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=100, eos_token_id=2, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    # cosine similarity is in [-1, 1]: a threshold of -2 flags every image, +2 none
    checker.concept_embeds_weights.data.fill_(-2.0 if flag_everything else 2.0)
    checker.special_care_embeds_weights.data.fill_(2.0)
    return checker, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipe, output_type):
    out = call(pipe, output_type=output_type, num_images_per_prompt=2, width=96)
    images = out.images
    if output_type == "pil":
        assert len(images) == 2 and images[0].size == (96, 64)
    elif output_type == "np":
        assert images.shape == (2, 64, 96, 3) and 0 <= images.min() and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (2, 3, 64, 96)
    else:
        assert images.shape == (2, 4, 8, 12)
    assert out.nsfw_content_detected is None


def test_prompt_list_images_per_prompt_and_embeds(pipe):
    prompts = ["a photo of a cat", "a painting of a dog"]
    by_text = call(pipe, prompt=prompts, negative_prompt=["blurry", "low quality"], num_images_per_prompt=2,
                   output_type="latent").images
    assert by_text.shape[0] == 4
    tokens = pipe._tokenize(prompts).input_ids
    embeds = pipe.runners.encode_text(tokens)
    negative = pipe.runners.encode_text(pipe._tokenize(["blurry", "low quality"]).input_ids)
    by_embeds = call(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative,
                     num_images_per_prompt=2, output_type="latent").images
    assert relative_error(by_embeds, by_text) < 1e-6
    # the two prompts give different images; the two images of one prompt differ too (own noise)
    assert relative_error(by_text[0], by_text[2]) > 1e-2 and relative_error(by_text[0], by_text[1]) > 1e-2


def test_seed_latents_and_generator(pipe):
    first = call(pipe, output_type="latent").images
    again = call(pipe, output_type="latent").images
    other = call(pipe, output_type="latent", generator=gen(1)).images
    assert torch.equal(first, again) and relative_error(other, first) > 1e-2
    latents = torch.randn(1, 4, 8, 8, generator=gen())
    given = call(pipe, output_type="latent", latents=latents, generator=None).images
    assert torch.equal(given, first)  # the seed-0 generator draws exactly these latents


def test_guidance_off_and_negative_prompt_matter(pipe):
    plain = call(pipe, output_type="latent").images
    negative = call(pipe, output_type="latent", negative_prompt="blurry").images
    no_cfg = call(pipe, output_type="latent", guidance_scale=1.0).images
    assert relative_error(negative, plain) > 1e-3 and relative_error(no_cfg, plain) > 1e-3


def test_callback_eta_clip_skip(pipe):
    seen = []
    call(pipe, num_inference_steps=4, callback=lambda i, t, x: seen.append((i, x.shape)), callback_steps=2)
    assert [i for i, _ in seen] == [0, 2] and seen[0][1] == (1, 4, 8, 8)
    base = call(pipe, num_inference_steps=3, output_type="latent").images
    with_eta = call(pipe, num_inference_steps=3, output_type="latent", eta=1.0).images
    skipped = call(pipe, num_inference_steps=3, output_type="latent", clip_skip=1).images
    assert relative_error(with_eta, base) > 1e-3 and relative_error(skipped, base) > 1e-3


def test_vae_slicing_same_images(pipe):
    whole = call(pipe, output_type="pt", num_images_per_prompt=3).images
    pipe.enable_vae_slicing()
    sliced = call(pipe, output_type="pt", num_images_per_prompt=3).images
    pipe.disable_vae_slicing()
    assert relative_error(sliced, whole) < 1e-5


@pytest.mark.parametrize("size", [(64, 96), (72, 72), (40, 120)])
def test_sizes_including_odd_latents(pipe, size):
    out = call(pipe, height=size[0], width=size[1], output_type="np")
    assert out.images.shape == (1, size[0], size[1], 3) and np.isfinite(out.images).all()


@torch.no_grad()
def test_a_latent_too_small_to_reflect_is_blurred_with_replicated_edges(tiny, pipe):
    """24x16 pixels: a 3x2 latent, a 2x1 SAG map. diffusers' blur reflect-pads by 4 and fails there; sagrt
    repeats the edge samples. The first degraded input against a reference written from the definitions
    (DDIM: x0 from eps, scipy's Gaussian with edge mode 'nearest' under the nearest-resized mask, re-noise)."""
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d
    from scipy.ndimage import gaussian_filter

    from sagrt.runners import UNetRecorder

    with pytest.raises(RuntimeError, match="(?i)padding size"):
        gaussian_blur_2d(torch.zeros(1, 4, 3, 2), 9, 1.0)
    pipe.runners = UNetRecorder(pipe.runners, lambda sample, noise_pred, score: (sample, noise_pred, score))
    x = torch.randn(1, 4, 3, 2, generator=gen(4))
    call(pipe, height=24, width=16, latents=x, generator=None, sag_scale=1.0, output_type="latent")
    (_, eps, score), (degraded, _, _) = pipe.runners.calls[:2]
    assert score.shape == (2, 2, 1) and degraded.shape == (1, 4, 3, 2)
    cell_mask = (score[0] > 1.0).double()
    assert 0 < cell_mask.sum() < cell_mask.numel()  # one of the two map cells: a real, partial mask
    rows, cols = torch.arange(3) * 2 // 3, torch.arange(2) * 1 // 2  # nearest: source index floor(i * in / out)
    mask = cell_mask[rows][:, cols]
    alpha = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[0]].double()
    x, eps_u = x.double(), eps[:1].double()
    x0 = (x - (1 - alpha).sqrt() * eps_u) / alpha.sqrt()
    blurred = torch.from_numpy(gaussian_filter(x0.numpy(), sigma=(0, 0, 1, 1), mode="nearest", truncate=4.0))
    x0_degraded = blurred * mask + x0 * (1 - mask)
    reference = alpha.sqrt() * x0_degraded + (1 - alpha).sqrt() * eps_u
    assert relative_error(degraded, reference) <= 1e-5
    assert relative_error(blurred, x0) > 1e-2  # the blur moved the masked cells


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=60), "multiple of 8"),
    (dict(width=8), "below this model's minimum"),
    (dict(num_inference_steps=0), ">= 1"),
    (dict(callback_steps=0), "callback_steps"),
    (dict(prompt=None), "exactly one of prompt"),
    (dict(output_type="gif"), "output_type"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents have shape"),
])
def test_bad_inputs(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        call(pipe, **kwargs)


def test_score_capture_restores_the_model(tiny):
    attn = tiny.unet.get_submodule(MID_BLOCK_LAYER)
    original = attn.processor
    sample, context = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_sag_score(tiny.unet) as capture:
            assert attn.processor is capture.processor
            raise RuntimeError("boom")
    assert attn.processor is original
    with torch.no_grad(), capture_sag_score(tiny.unet) as capture:
        tiny.unet(sample, 10, context)
    score = capture.score_map()
    assert score.shape == (2, 4, 6) and score.dtype == torch.float32
    # attention received per key, averaged over heads: sums to the number of queries, mean 1
    assert torch.allclose(score.mean(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert attn.processor is original and not tiny.unet.mid_block.attentions[0]._forward_pre_hooks
    with pytest.raises(SAGLayerError, match="does not exist"):
        with capture_sag_score(tiny.unet, "mid_block.attentions.3.transformer_blocks.0.attn1"):
            pass


def test_model_folder_round_trip(tiny, tmp_path):
    folder = save_tiny_folder(tiny, tmp_path / "model")
    loaded = SAGPipeline.from_pretrained(str(folder), backend="torch")
    loaded.set_progress_bar_config(disable=True)
    preset = SAGPipeline.from_pretrained("tiny", backend="torch")
    preset.set_progress_bar_config(disable=True)
    a, b = call(loaded, output_type="latent").images, call(preset, output_type="latent").images
    assert relative_error(a, b) < 1e-6
    assert loaded.info.fingerprint.startswith("folder-") and preset.info.fingerprint.startswith("preset-")


def test_model_folder_errors(tiny, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nothing")
    folder = save_tiny_folder(tiny, tmp_path / "model")
    import shutil

    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelError, match="lacks vae/"):
        load_model(folder)
    with pytest.raises(ModelError, match="unknown model"):
        load_model("sd99")


@pytest.mark.parametrize("flag_everything", [True, False])
def test_safety_checker_runs_as_in_diffusers(tiny, tmp_path, flag_everything):
    from diffusers import StableDiffusionSAGPipeline

    checker, extractor = tiny_safety_checker(flag_everything)
    folder = save_tiny_folder(tiny, tmp_path / "model", checker, extractor)
    ours = SAGPipeline.from_pretrained(str(folder), backend="torch")
    ours.set_progress_bar_config(disable=True)
    out = call(ours, output_type="np", num_images_per_prompt=2)
    assert out.nsfw_content_detected == [flag_everything] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = StableDiffusionSAGPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ref = call(theirs, output_type="np", num_images_per_prompt=2)
    assert out.nsfw_content_detected == list(ref.nsfw_content_detected)
    assert (out.images.max() == 0) == flag_everything  # flagged images come back black
    if not flag_everything:
        assert relative_error(out.images, ref.images) < 1e-5
    off = SAGPipeline.from_pretrained(str(folder), backend="torch", safety_checker=False)
    off.set_progress_bar_config(disable=True)
    assert call(off, output_type="np").nsfw_content_detected is None


def test_scheduler_that_cannot_make_the_steps(tiny):
    from sagrt.runtime.schedulers import make_scheduler

    pipe = SAGPipeline(TorchRunners(tiny), tiny.tokenizer, make_scheduler("pndm", tiny.scheduler.config),
                       ModelInfo.of(tiny))
    with pytest.raises(InputError, match="PNDMScheduler cannot schedule 2 steps"):
        call(pipe, num_inference_steps=2)
