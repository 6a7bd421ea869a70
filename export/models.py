"""What a "model" is to sagrt: built-in presets made in code, or a local diffusers folder.

Presets built in code have seeded random weights (the same on every machine with the same torch) and
nothing is downloaded: `tiny` for tests, `small` (SD 1.5 topology at reduced width) for CPU
measurements, `sd15` (the full SD 1.5 architecture) for GPU measurements. `shapes` is trained
(training/train_shapes.py) and ships in the package as a diffusers folder under export/presets/: it
draws coloured shapes on coloured backgrounds ("a red circle on a blue background") at 64x64.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sagrt.errors import SagrtError
from sagrt.export import artifacts

ASSETS = Path(__file__).parent / "assets"
PRESET_FOLDERS = Path(__file__).parent / "presets"
REQUIRED_FOLDERS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


class ModelError(SagrtError):
    """A model name or folder that cannot be loaded; the message says what to fix."""


@dataclass
class Preset:
    unet: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    folder: str | None = None  # a trained preset: its diffusers folder's name under export/presets/


_TINY_VOCAB = 591  # len(export/assets/vocab.json)
_TEXT = dict(vocab_size=_TINY_VOCAB, max_position_embeddings=77, bos_token_id=589, eos_token_id=590,
             pad_token_id=590)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=[2, 4], norm_num_groups=32,
        ),
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, **_TEXT),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
        ),
    ),
    "small": Preset(
        unet=dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
        ),
        text_encoder=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          **_TEXT),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
            block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
        ),
    ),
    "sd15": Preset(
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        ),
        # CLIP ViT-L/14 text tower; the built-in tokenizer uses only the first ids of its vocabulary
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
                          bos_token_id=589, eos_token_id=590, pad_token_id=590),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        ),
    ),
    "shapes": Preset(folder="shapes"),
}


@dataclass
class Components:
    """The diffusers/transformers modules of one Stable Diffusion model, in eval mode."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any
    safety_checker: Any = None
    feature_extractor: Any = None
    source: str = "tiny"
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def min_latent_side(self) -> int:
        """Smallest latent side the UNet takes: one pixel left at its coarsest level."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)


def final_layer_norm(text_encoder):
    """CLIP's last LayerNorm: under `text_model` in transformers 4, on the model itself in transformers 5."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def builtin_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"), model_max_length=77)


def build_preset(name: str) -> Components:
    """Builds a preset's modules from its configs with weights drawn from the preset's seed, or loads a
    trained preset's folder from the package."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = PRESETS[name]
    if preset.folder:
        components = load_folder(preset_folder(name), safety_checker=False)
        components.source, components.fingerprint = name, preset_fingerprint(name)
        return components
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        unet = UNet2DConditionModel(**preset.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        vae = AutoencoderKL(**preset.vae)
    return Components(
        tokenizer=builtin_tokenizer(), text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
        scheduler=DDIMScheduler(**SD_SCHEDULER), source=name, fingerprint=preset_fingerprint(name),
    )


def preset_fingerprint(name: str) -> str:
    """Hash of a preset's configs, seed and torch version (its weights follow from them), without building it;
    for a trained preset, the hash of its folder."""
    preset = PRESETS[name]
    if preset.folder:
        return "preset-" + folder_fingerprint(preset_folder(name)).removeprefix("folder-")
    payload = json.dumps([name, preset.unet, preset.text_encoder, preset.vae, preset.seed, torch.__version__],
                         sort_keys=True, default=str)
    return "preset-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def preset_folder(name: str) -> Path:
    """The diffusers folder of a trained preset, inside the package."""
    path = PRESET_FOLDERS / str(PRESETS[name].folder)
    if not (path / "unet").is_dir():
        raise ModelError(f"preset {name!r} has no weights at {path}: reinstall sagrt with its package data, "
                         f"or train them (python -m training.train_shapes)")
    return path


def folder_fingerprint(path: Path) -> str:
    """Hash of a model folder: every file's relative path and the sha256 of its whole content, so that a change
    to any weight (a LoRA merged into some layers) gives another fingerprint and another export. Each file is
    read once: its sha256 is remembered in sagrt's cache under its size, modification time and inode
    (see artifacts.recorded_sha256s and docs/NOTES.md for the cost)."""
    path = Path(path)
    names = sorted(file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file())
    digests = artifacts.recorded_sha256s(path, names, record_path=model_hash_record(path), confined=False)
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{digests[name]}\n".encode())
    return "folder-" + digest.hexdigest()[:16]


def model_hash_record(path: Path) -> Path:
    """Where the sha256s of a model folder's files are remembered: in sagrt's cache, not in the user's folder."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return artifacts.cache_root() / "model-hashes" / f"{key}.json"


def save_scheduler(scheduler, path: str | Path) -> None:
    """Writes scheduler_config.json without the values the scheduler took by default, so that loading it and
    switching scheduler class (from_config) gives what the in-memory scheduler gives: diffusers carries over
    only explicitly set values (e.g. DDIM's timestep_spacing default must not reach DPM-Solver)."""
    config = dict(scheduler.config)
    defaulted = set(config.pop("_use_default_values", []))
    config = {key: value for key, value in config.items() if key not in defaulted}
    config["_class_name"] = type(scheduler).__name__
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))


def load_scheduler(path: str | Path):
    """The diffusers scheduler a saved scheduler folder (scheduler_config.json) describes."""
    import diffusers

    file = Path(path) / "scheduler_config.json"
    try:
        config = json.loads(file.read_text())
        name = config["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{file} is not a readable scheduler config ({type(err).__name__}: {err})") from None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelError(f"{file} names {name!r}, which is not a diffusers scheduler: set _class_name to one, "
                         f"e.g. DDIMScheduler")
    return cls.from_config(config)


def load_folder(path: str | Path, safety_checker: bool = True) -> Components:
    """Loads a local diffusers-format Stable Diffusion folder (no network)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist: name a preset (tiny, small, sd15) or a diffusers-format folder")
    missing = [name for name in REQUIRED_FOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelError(f"model folder {path} lacks {', '.join(missing)}/ (a diffusers folder has "
                         f"{', '.join(REQUIRED_FOLDERS)})")
    scheduler = load_scheduler(path / "scheduler")  # first: it is read in a moment, the UNet takes long
    try:
        components = Components(
            tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True).eval(),
            unet=UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).eval(),
            vae=AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).eval(),
            scheduler=scheduler,
            source=str(path.resolve()),
            fingerprint=folder_fingerprint(path),
        )
    except Exception as err:  # whatever a foreign folder's files raise (unpickling, safetensors, configs...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model folder {path}: {reason}") from err
    if safety_checker:
        components.safety_checker, components.feature_extractor = load_safety_checker(path)
    return components


def load_safety_checker(path: str | Path):
    """(safety checker, feature extractor) of a diffusers folder, or (None, None) when it has none."""
    path = Path(path)
    if not (path / "safety_checker").is_dir():
        return None, None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(path / "safety_checker", local_files_only=True).eval()
    return checker, CLIPImageProcessor.from_pretrained(path / "feature_extractor", local_files_only=True)


def model_fingerprint(model: str | Path) -> str:
    """The fingerprint `load_model(model)` would give, without loading the weights."""
    if str(model) in PRESETS:
        return preset_fingerprint(str(model))
    path = Path(model)
    if not path.is_dir():
        load_model(model)  # raises the error that says what is wrong with the name or path
    return folder_fingerprint(path)


def load_model(model: str | Path, safety_checker: bool = True) -> Components:
    """`model` is a preset name (tiny, small, sd15, shapes) or a local diffusers folder."""
    if str(model) in PRESETS:
        return build_preset(str(model))
    path = Path(model)
    if not path.exists() and "/" not in str(model) and "\\" not in str(model):
        raise ModelError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) or a diffusers folder path")
    return load_folder(path, safety_checker=safety_checker)
