"""Trains the `shapes` preset: a complete Stable Diffusion model on the synthetic shapes data set.

Stages, each seeded and each saved under --work before the next starts (rerun with --stages to redo one):

1. classifier  the judge for the evaluation and the test (training/shapes_classifier.safetensors)
2. vae         AutoencoderKL, 64x64 RGB -> 4x8x8 latents (the usual /8), reconstruction + small KL loss;
               its scaling_factor is set so the training latents have unit standard deviation
   decoder     more steps for the VAE decoder alone (the latents do not change, so it may run in a second
               process beside the UNet's: --stages decoder)
3. unet        UNet2DConditionModel (cross-attention, self-attention mid block: SAG's layer) and a
               2-layer CLIP text encoder with the package's tokenizer extended by the caption words,
               trained together on epsilon prediction with 10 % empty captions (classifier-free guidance)
4. save        the diffusers folder (--output, default export/presets/shapes), safetensors weights

Run from the checkout root: python -m training.train_shapes   (see --help; a loss log goes to
--work/loss.jsonl, one line per 50 steps). The shipped weights were made with the defaults on the project's
2-core CPU with nothing else running, the unet and save stages rerun in a second process over the same --work
(times and why on benchmarks/RESULTS-shapes.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import shapes_classifier
from training.shapes_data import CAPTION_WORDS, Batch, captions, sample

ROOT = Path(__file__).resolve().parent.parent
SEED = 17

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
)
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # the prompt reaches the 8x8 level too
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(4, 8), norm_num_groups=32,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, bos_token_id=589, eos_token_id=590, pad_token_id=590)


def append_log(work: Path, record: dict) -> None:
    """One JSON line appended to work/loss.jsonl (loss lines and each stage's minutes)."""
    with open(work / "loss.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")


class LossLog:
    """Appends one JSON line per logged step to work/loss.jsonl and shows the running loss on the bar."""

    def __init__(self, work: Path, stage: str):
        self.work, self.stage, self.avg = work, stage, None

    def add(self, step: int, bar, **losses):
        total = losses["loss"]
        self.avg = total if self.avg is None else 0.98 * self.avg + 0.02 * total
        bar.set_postfix(loss=f"{self.avg:.4f}", refresh=False)  # the bar redraws at its own pace
        if step % 50 == 0:
            append_log(self.work, {"stage": self.stage, "step": step, "time": round(time.time(), 1),
                                   **{k: round(v, 5) for k, v in losses.items()}})


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_classifier(work: Path, steps: int, batch: int) -> None:
    """Shape / colour / background classifier on fresh samples, lightly degraded so that it also judges the
    slightly soft images a diffusion model makes."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    model = shapes_classifier.ShapesClassifier(width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    log = LossLog(work, "classifier")
    bar = tqdm(range(steps), desc="classifier", file=sys.stdout, mininterval=5)
    for step in bar:
        set_lr(opt, lr_at(step, steps, 2e-3))
        data = sample(batch, gen)
        images = degrade(data.images, gen)
        out = model(images)
        loss = (F.cross_entropy(out["shape"], data.shape) + F.cross_entropy(out["colour"], data.colour)
                + F.cross_entropy(out["background"], data.background))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(step, bar, loss=loss.item())
    shapes_classifier.save(model.eval(), work / "classifier.safetensors")
    shapes_classifier.save(model.eval())


def degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (half the samples) and pixel noise, as augmentation."""
    n = images.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(images.shape, generator=gen)
    return (pick * blurred + (1 - pick) * images + noise).clamp(-1, 1)


def train_vae(work: Path, steps: int, batch: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 2)
    vae = AutoencoderKL(**VAE_CONFIG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    log = LossLog(work, "vae")
    bar = tqdm(range(steps), desc="vae", file=sys.stdout, mininterval=5)
    for step in bar:
        set_lr(opt, lr_at(step, steps, 1e-3))
        images = sample(batch, gen).images
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.mse_loss(recon, images) + 0.5 * F.l1_loss(recon, images)
        kl = posterior.kl().mean() / images[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(step, bar, loss=loss.item(), rec=rec.item(), kl=kl.item())
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(sample(512, gen).images).latent_dist.sample(generator=gen)
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    vae.save_pretrained(work / "vae", safe_serialization=True)


def train_decoder(work: Path, steps: int, batch: int) -> None:
    """More training for the VAE decoder alone: the encoder, hence the UNet's latents, stay as they are, so this
    stage can run beside or after the UNet's."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 5)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.requires_grad_(False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in decoder:
        param.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(decoder, lr=1e-3, weight_decay=0.0)
    log = LossLog(work, "decoder")
    bar = tqdm(range(steps), desc="decoder", file=sys.stdout, mininterval=5)
    for step in bar:
        set_lr(opt, lr_at(step, steps, 1e-3))
        images = sample(batch, gen).images
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=gen)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, images) + 0.5 * F.l1_loss(recon, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(step, bar, loss=loss.item())
    vae.eval().save_pretrained(work / "vae", safe_serialization=True)


def tokenizer_folder(folder: Path) -> Path:
    """Writes the package's tokenizer with the caption words as whole tokens into folder."""
    sys.path.insert(0, str(ROOT / "export" / "assets"))
    from make_vocab import write

    write(folder, CAPTION_WORDS)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}, indent=2))
    return folder


def make_latents(work: Path, count: int):
    """The UNet's training set: `count` samples encoded once (latent mean), with their classes."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    gen = torch.Generator().manual_seed(SEED + 3)
    chunks, shapes, colours, backgrounds = [], [], [], []
    with torch.no_grad():
        for _ in tqdm(range(count // 500), desc="encode", file=sys.stdout, mininterval=5):
            data = sample(500, gen)
            chunks.append(vae.encode(data.images).latent_dist.mean * vae.config.scaling_factor)
            shapes.append(data.shape), colours.append(data.colour), backgrounds.append(data.background)
    return torch.cat(chunks), torch.cat(shapes), torch.cat(colours), torch.cat(backgrounds)


def train_unet(work: Path, steps: int, batch: int, count: int, stop: int | None = None) -> None:
    """`steps` sets the learning-rate schedule; `stop` ends training (and saves) earlier on that schedule."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sagrt.export.models import SD_SCHEDULER

    latents, shape, colour, background = make_latents(work, count)
    tok_dir = tokenizer_folder(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 4)
    unet = UNet2DConditionModel(**UNET_CONFIG).train()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG)).train()
    ema = [copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(text).eval().requires_grad_(False)]
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=1e-2)
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    log = LossLog(work, "unet")
    last = min(steps, stop or steps)
    bar = tqdm(range(last), desc="unet", file=sys.stdout, mininterval=5)
    for step in bar:
        set_lr(opt, lr_at(step, steps, 8e-4, warmup=200))
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        if torch.rand(1, generator=gen).item() < 0.5:  # the data set is mirror symmetric
            x0 = x0.flip(3)
        texts = captions(Batch(None, shape[idx], colour[idx], background[idx]), gen)
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        eps = unet(xt, t, text(ids)[0]).sample
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for avg, live in zip(ema, (unet, text)):
                for pa, pl in zip(avg.parameters(), live.parameters()):
                    pa.lerp_(pl, 1 - decay)
        log.add(step, bar, loss=loss.item())
        if (step + 1) % 1000 == 0 or step + 1 == last:
            ema[0].save_pretrained(work / "unet", safe_serialization=True)
            ema[1].save_pretrained(work / "text_encoder", safe_serialization=True)


def save_folder(work: Path, output: Path) -> None:
    """Assembles the diffusers folder from the stages' outputs."""
    import shutil

    from diffusers import DDIMScheduler

    from sagrt.export.models import SD_SCHEDULER, save_scheduler

    output.mkdir(parents=True, exist_ok=True)
    for part in ("vae", "unet", "text_encoder", "tokenizer"):
        if (output / part).exists():
            shutil.rmtree(output / part)
        shutil.copytree(work / part, output / part)
    save_scheduler(DDIMScheduler(**SD_SCHEDULER), output / "scheduler")
    (output / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="classifier,vae,decoder,unet,save")
    parser.add_argument("--work", type=Path, default=ROOT / "training" / "out")
    parser.add_argument("--output", type=Path, default=ROOT / "export" / "presets" / "shapes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--classifier-steps", type=int, default=1200)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--decoder-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=3400)
    parser.add_argument("--batch", type=int, default=32, help="classifier batch")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-stop", type=int, default=None,
                        help="end the UNet's training after this many steps of its --unet-steps schedule")
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--latents", type=int, default=40000, help="training images the UNet sees")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {
        "classifier": lambda: train_classifier(args.work, args.classifier_steps, args.batch),
        "vae": lambda: train_vae(args.work, args.vae_steps, args.vae_batch),
        "decoder": lambda: train_decoder(args.work, args.decoder_steps, args.vae_batch),
        "unet": lambda: train_unet(args.work, args.unet_steps, args.unet_batch, args.latents, args.unet_stop),
        "save": lambda: save_folder(args.work, args.output),
    }
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(runs))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}: choose from {','.join(runs)}")
    start = time.time()
    for stage in [s for s in runs if s in stages]:
        began = time.time()
        runs[stage]()
        minutes = (time.time() - began) / 60
        append_log(args.work, {"stage": stage, "minutes": round(minutes, 2), "threads": args.threads})
        print(f"{stage} done in {minutes:.1f} min", flush=True)
    print(f"done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
