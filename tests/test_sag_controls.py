"""SAG's own controls (threshold, blur, step window, layer) in the Python API and the CLI, and their errors."""

import dataclasses

import pytest
import torch

from sagrt.networks import MID_BLOCK_LAYER
from sagrt.runtime import SAGPipeline
from sagrt.runtime.cli import build_parser, main
from sagrt.runtime.commands.common import sag_config
from sagrt.runtime.pipeline import InputError, SAGConfig
from sagrt.runners import ModelInfo
from sagrt.runtime.torch_runners import TorchRunners
from sagrt.runtime.schedulers import make_scheduler
from test_schedulers import SpyRunners

UP_LAYER = "up_blocks.0.attentions.0.transformer_blocks.0.attn1"


def degraded_calls(tiny, scheduler="ddim", steps=4, **kwargs):
    """Indices of the model calls that were followed by a degraded pass (CFG on: full calls run at batch 2, the
    degraded pass at batch 1), and the number of model calls."""
    pipe = SAGPipeline(SpyRunners(TorchRunners(tiny)), tiny.tokenizer, make_scheduler(scheduler, tiny.scheduler.config),
                       ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", height=64, width=64, num_inference_steps=steps, output_type="latent",
         generator=torch.Generator().manual_seed(0), **kwargs)
    batches = [sample.shape[0] for sample, _ in pipe.runners.calls]
    model_calls = [i for i, batch in enumerate(batches) if batch == 2]
    degraded = [k for k, i in enumerate(model_calls) if i + 1 < len(batches) and batches[i + 1] == 1]
    assert len(batches) == len(model_calls) + len(degraded)  # every batch-1 call follows a model call
    return degraded, len(model_calls)


def test_defaults_are_diffusers_values():
    config = SAGConfig()
    assert (config.threshold, config.blur_sigma, config.blur_kernel, config.window) == (1.0, 1.0, 9, (0.0, 1.0))
    args = build_parser().parse_args(["generate", "--model", "tiny", "x"])
    assert sag_config(args) == config
    assert args.sag_layer == MID_BLOCK_LAYER


@pytest.mark.parametrize("window, degraded", [((0.0, 1.0), [0, 1, 2, 3]), ((0.0, 0.5), [0, 1]), ((0.5, 1.0), [2, 3]),
                                              ((0.25, 0.5), [1])])
def test_window_runs_the_degraded_pass_on_its_steps_only(tiny, window, degraded):
    assert degraded_calls(tiny, sag_scale=0.75, sag=SAGConfig(window=window)) == (degraded, 4)


def test_window_on_two_call_scheduler(tiny):
    # Heun, 3 steps: 5 model calls (t0, t1, t1, t2, t2); the window counts model calls
    assert degraded_calls(tiny, "heun", steps=3, sag_scale=0.75) == ([0, 1, 2, 3, 4], 5)
    assert degraded_calls(tiny, "heun", steps=3, sag_scale=0.75, sag=SAGConfig(window=(0.0, 0.5))) == ([0, 1, 2], 5)
    assert degraded_calls(tiny, "heun", steps=3, sag_scale=0.75, sag=SAGConfig(window=(0.5, 1.0))) == ([3, 4], 5)


def test_blur_and_threshold_change_the_result(tiny):
    def latents(**sag):
        pipe = SAGPipeline(TorchRunners(tiny), tiny.tokenizer, make_scheduler("ddim", tiny.scheduler.config),
                           ModelInfo.of(tiny))
        pipe.set_progress_bar_config(disable=True)
        return pipe("a cat", height=64, width=64, num_inference_steps=3, output_type="latent", sag_scale=1.0,
                    generator=torch.Generator().manual_seed(0), sag=SAGConfig(**sag)).images

    default = latents()
    for sag in (dict(blur_sigma=3.0), dict(blur_kernel=5), dict(threshold=0.5)):
        assert not torch.allclose(latents(**sag), default, rtol=0, atol=1e-6), sag


@pytest.mark.parametrize("window", [(0.5, 0.2), (0.0, 1.5), (-0.1, 1.0), (0.3, 0.3)])
def test_api_refuses_bad_window(window):
    with pytest.raises(InputError, match="SAG window"):
        SAGConfig(window=window)


@pytest.mark.parametrize("option, value, message", [
    ("--sag-window", "0.5:0.2", "SAG window 0.5:0.2 must satisfy 0 <= start < end <= 1"),
    ("--sag-window", "0:1.5", "SAG window 0.0:1.5 must satisfy 0 <= start < end <= 1"),
    ("--sag-window", "half", "--sag-window 'half' must be START:END, e.g. 0:0.5"),
    ("--sag-blur-sigma", "0", "SAG blur sigma must be positive, got 0.0"),
    ("--sag-blur-sigma", "-1", "SAG blur sigma must be positive, got -1.0"),
    ("--sag-blur-kernel", "8", "SAG blur kernel size must be a positive odd number, got 8"),
    ("--sag-layer", "up_blocks.7.attentions.0.transformer_blocks.0.attn1", "does not exist in this UNet"),
    ("--sag-layer", "mid_block.attentions.0.transformer_blocks.0.attn2", "is not a self-attention layer"),
])
def test_cli_refuses_bad_sag_controls(tmp_path, capsys, option, value, message):
    out = tmp_path / "out"
    rc = main(["generate", "--model", "tiny", "a cat", "--steps", "2", "--height", "64", "--width", "64", "--out", str(out),
               option, value])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sagrt generate: error: ") and message in lines[0], err
    assert not out.exists()


def test_cli_up_block_layer_runs(tmp_path, capsys):
    rc = main(["generate", "--model", "tiny", "a cat", "--steps", "2", "--height", "64", "--width", "96", "--sag-layer", UP_LAYER,
               "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_layer_choice_sets_the_score_map(tiny):
    """A UNet with self-attention at full latent resolution: an up-block layer there gives a 2x larger map than the
    mid block, and through from_pretrained the tiny preset's up-block layer is used."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=[2, 4],
        norm_num_groups=32).eval()
    components = dataclasses.replace(tiny, unet=unet)
    sample = torch.randn(2, 4, 8, 12)
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        _, mid = TorchRunners(components, MID_BLOCK_LAYER).unet(sample, torch.tensor(500), context)
        _, up = TorchRunners(components, "up_blocks.1.attentions.0.transformer_blocks.0.attn1").unet(
            sample, torch.tensor(500), context)
    assert mid.shape == (2, 4, 6) and up.shape == (2, 8, 12)
    assert torch.allclose(up.mean(dim=(1, 2)), torch.ones(2), atol=1e-5)  # attention received, mean 1.0

    pipe = SAGPipeline.from_pretrained("tiny", backend="torch", sag_layer=UP_LAYER)
    assert pipe.runners.sag_layer == UP_LAYER and pipe.info.sag_layer == UP_LAYER
