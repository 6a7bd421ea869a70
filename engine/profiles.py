"""What a TensorRT build covers: the BuildConfig, the optimisation profile of each network, and
the shape check every engine call goes through.

Sizes in a BuildConfig are images (pixels, images per batch); profiles are tensor shapes, found by
putting latent sizes and batches into the symbolic shapes of the exported graphs (export/specs.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from sagrt.errors import SagrtError
from sagrt.export.specs import NetworkSpec, TensorSpec

ENGINE_PRECISIONS = ("fp16", "fp32")  # TensorRT engines; the SAG score stays float32
# what sagrt puts in an engine besides the config: 2 = two UNet profiles (B and 2B); a change rebuilds
ENGINE_LAYOUT = 2
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT builder optimisation levels 0..5 (3 is TensorRT's default)


class BuildConfigError(SagrtError):
    """A build option out of range."""


class ProfileError(SagrtError):
    """A shape outside what the engines were built for."""


@dataclass(frozen=True)
class Range:
    """min <= opt <= max of one size; TensorRT tunes its kernels for opt."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, option: str) -> "Range":
        """'MIN:OPT:MAX', or one number N for the static range N:N:N."""
        try:
            values = [int(part) for part in str(text).split(":")]
        except ValueError:
            values = []
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise BuildConfigError(f"{option} {text!r} must be MIN:OPT:MAX or one number, e.g. 256:512:768")
        return cls(*values).checked(option)

    def checked(self, option: str) -> "Range":
        if not 1 <= self.min <= self.opt <= self.max:
            raise BuildConfigError(f"{option} {self} must satisfy 1 <= MIN <= OPT <= MAX")
        return self

    @property
    def static(self) -> bool:
        return self.min == self.max

    def covering(self, value: int) -> "Range":
        return Range(min(self.min, value), self.opt, max(self.max, value))

    def __str__(self) -> str:
        return str(self.min) if self.static else f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class BuildConfig:
    """Everything a TensorRT build depends on besides the ONNX files and the machine.

    `batch` counts images per call (prompts x images per prompt): the UNet profile covers batch B
    (SAG's degraded pass) up to 2B (the classifier-free guidance pass). height/width are pixels;
    None takes the model's default size, with half to twice that size as the range. `static` keeps
    only the OPT values (one size, one batch B; the UNet still runs at B and 2B).
    """

    precision: str = "fp16"
    batch: Range = Range(1, 1, 4)
    height: Range | None = None
    width: Range | None = None
    static: bool = False
    optimization_level: int = 3
    workspace_gib: float | None = None
    timing_cache: str | None = None  # file; not part of the cache key (it changes build time, not the engine)

    def __post_init__(self):
        if self.precision not in ENGINE_PRECISIONS:
            raise BuildConfigError(f"precision {self.precision!r} must be one of {', '.join(ENGINE_PRECISIONS)}")
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise BuildConfigError(f"builder optimisation level {self.optimization_level} must be 0..5")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise BuildConfigError(f"workspace limit {self.workspace_gib} GiB must be positive")

    def resolved(self, info) -> "BuildConfig":
        """Sizes filled in from the model (a ModelInfo) and checked against it."""
        factor, smallest = info.vae_scale_factor, info.min_latent_side * info.vae_scale_factor
        default = info.sample_size * factor
        fallback = Range(max(smallest, default // 2 // factor * factor), default, default * 2)
        sizes = {}
        for name in ("height", "width"):
            size = getattr(self, name) or fallback
            if self.static:
                size = Range(size.opt, size.opt, size.opt)
            for value in (size.min, size.opt, size.max):
                if value % factor:
                    raise BuildConfigError(f"{name} {size}: every size must be a multiple of {factor} pixels")
            if size.min < smallest:
                raise BuildConfigError(f"{name} {size}: this model's smallest image side is {smallest} pixels")
            sizes[name] = size
        batch = Range(self.batch.opt, self.batch.opt, self.batch.opt) if self.static else self.batch
        return replace(self, batch=batch, **sizes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BuildConfig":
        sizes = {k: Range(**data[k]) if data.get(k) else None for k in ("batch", "height", "width")}
        return cls(**{**data, **sizes})

    def cli_args(self) -> str:
        """The `sagrt build` options that give this config."""
        args = [f"--precision {self.precision}", f"--batch {self.batch}"]
        args += [f"--{name} {getattr(self, name)}" for name in ("height", "width") if getattr(self, name)]
        args += ["--static"] if self.static else []
        args += [f"--optimization-level {self.optimization_level}"]
        args += [f"--workspace {self.workspace_gib:g}"] if self.workspace_gib else []
        args += [f"--timing-cache {self.timing_cache}"] if self.timing_cache else []
        return " ".join(args)


def cache_key(config: BuildConfig, tensorrt_version: str, onnx_sha256: dict[str, str], gpu: dict) -> str:
    """Names an engine build: same key, same engines. The timing cache only changes build time."""
    payload = {"layout": ENGINE_LAYOUT, "config": {**config.to_dict(), "timing_cache": None},
               "tensorrt": tensorrt_version,
               "onnx": dict(sorted(onnx_sha256.items())), "gpu": gpu}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def engine_filename(network: str, tensorrt_version: str) -> str:
    """Engine files carry the TensorRT version that wrote them (as TensorRT's demo does)."""
    return f"{network}.trt{tensorrt_version}.plan"


# ---- profiles ----------------------------------------------------------------------------------
def network_inputs(export_manifest: dict, network: str) -> tuple[TensorSpec, ...]:
    """The exported graph's inputs with their symbolic shapes, as the export manifest lists them."""
    return NetworkSpec.from_table(network, export_manifest["networks"][network]).inputs


def network_dims(network: str, config: BuildConfig, scale: int) -> list[dict[str, Range]]:
    """Ranges of the symbolic dimensions (B, H, W) of one network's inputs, one dict per optimisation profile."""
    latent = {"H": _latent(config.height, scale), "W": _latent(config.width, scale)}
    if network == "unet":
        # one SAG step calls the UNet at 2B (CFG pass) and at B (degraded pass): two profiles over the same
        # range, each tuned (opt) for one of the two batches; a call picks the one tuned for its own batch
        b = config.batch
        return [{"B": Range(b.min, 2 * b.opt, 2 * b.max), **latent}, {"B": Range(b.min, b.opt, 2 * b.max), **latent}]
    # the text encoder sees one prompt list at a time, the VAE one image when slicing: both from 1
    return [{"B": Range(1, config.batch.opt, config.batch.max), **latent}]


def _latent(size: Range, scale: int) -> Range:
    return Range(size.min // scale, size.opt // scale, size.max // scale)


def input_profile(inputs: tuple[TensorSpec, ...], dims: dict[str, Range]) -> dict[str, list[list[int]]]:
    """{input name: [min shape, opt shape, max shape]} for one TensorRT optimisation profile."""
    def shape(spec, pick):
        return [pick(dims[d]) if isinstance(d, str) else int(d) for d in spec.shape]

    return {spec.name: [shape(spec, lambda r: r.min), shape(spec, lambda r: r.opt), shape(spec, lambda r: r.max)]
            for spec in inputs}


def build_profiles(export_manifest: dict, config: BuildConfig, scale: int) -> dict[str, list[dict]]:
    """The optimisation profiles of every exported network (a list each, in engine order), for a resolved config."""
    return {network: [input_profile(network_inputs(export_manifest, network), dims)
                      for dims in network_dims(network, config, scale)]
            for network in export_manifest["networks"]}


def pick_profile(profiles: list[dict], shapes: dict[str, tuple]) -> int:
    """Index of the profile a call runs in: among those covering its shapes, the one whose opt shapes are
    nearest (the UNet's B call gets the profile tuned for B, its 2B call the one tuned for 2B); ties go to
    the first. -1 when none covers the call."""
    best, best_distance = -1, None
    for index, profile in enumerate(profiles):
        if not all(name in shapes and _inside(tuple(shapes[name]), low, high)
                   for name, (low, _, high) in profile.items()):
            continue
        distance = sum(abs(s - o) for name, (_, opt, _) in profile.items() for s, o in zip(shapes[name], opt))
        if best_distance is None or distance < best_distance:
            best, best_distance = index, distance
    return best


def _inside(shape: tuple, low, high) -> bool:
    return len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))


# ---- shape check -------------------------------------------------------------------------------
def check_shapes(network: str, shapes: dict[str, tuple], profile: dict[str, list], rebuild: Callable[[], str]) -> None:
    """Refuses a call whose input shapes fall outside the engine's profile, before TensorRT sees it.
    `rebuild()` gives the command that builds engines covering the call (only asked on failure)."""
    for name, (low, _, high) in profile.items():
        if name not in shapes:
            raise ProfileError(f"TensorRT engine {network}: input {name!r} missing (got {sorted(shapes)})")
        shape = tuple(shapes[name])
        if not _inside(shape, low, high):
            raise ProfileError(f"TensorRT engine {network}: {name} shape {shape} is outside the built profile "
                               f"{tuple(low)}..{tuple(high)}; rebuild with ranges that cover it: {rebuild()}")


def covering_config(config: BuildConfig, network: str, dims: dict[str, int], scale: int) -> BuildConfig:
    """The smallest widening of `config` whose profiles include one call's dimension values."""
    sizes = {}
    if "H" in dims:
        sizes["height"] = config.height.covering(dims["H"] * scale)
    if "W" in dims:
        sizes["width"] = config.width.covering(dims["W"] * scale)
    if "B" in dims:
        # UNet batches run up to 2B: a batch b needs B_max >= ceil(b / 2) and B_min <= b
        b, most = dims["B"], math.ceil(dims["B"] / 2) if network == "unet" else dims["B"]
        sizes["batch"] = Range(min(config.batch.min, b), config.batch.opt, max(config.batch.max, most))
    return replace(config, static=False, **sizes)


def symbolic_dims(inputs: tuple[TensorSpec, ...], shapes: dict[str, tuple]) -> dict[str, int]:
    """Values of the symbolic dimensions in one call's concrete input shapes."""
    return {d: int(s) for spec in inputs if spec.name in shapes
            for d, s in zip(spec.shape, shapes[spec.name]) if isinstance(d, str)}
