"""What `sagrt bench` measures: the configuration, its checks and the command that reproduces it."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass

from sagrt.errors import SagrtError
from sagrt.runtime.backends import BACKEND_NAMES, REGISTRY

BASELINE = "diffusers"
PROMPT = "a photo of an astronaut riding a horse"
BASELINE_PRECISIONS = ("fp32", "bf16")  # diffusers eager in torch float32 or bfloat16


class BenchError(SagrtError):
    """A bench argument out of range, or a backend that could not be measured."""



@dataclass(frozen=True)
class BenchConfig:
    """What `sagrt bench` measures: every backend plus the diffusers baseline at every size."""

    model: str = "tiny"
    backends: tuple[str, ...] = ("onnxruntime",)
    sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    steps: int = 20
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    cfg_repeats: int | None = None  # sag_scale=0 runs for the SAG overhead; None: as many as repeats
    guidance_scale: float = 7.5
    sag_scale: float = 0.75
    scheduler: str | None = None
    seed: int = 0
    prompt: str = PROMPT
    device: str | None = None
    baseline_precision: str = "fp32"  # diffusers' eager baseline: fp32 or bf16

    def __post_init__(self):
        if not self.backends:
            raise BenchError("--backends is empty: name at least one of " + ", ".join(BACKEND_NAMES))
        for backend in self.backends:
            parse_backend_spec(backend)
        if self.baseline_precision not in BASELINE_PRECISIONS:
            raise BenchError(f"--baseline-dtype {self.baseline_precision!r} must be one of "
                             f"{', '.join(BASELINE_PRECISIONS)}")
        if len(set(self.backends)) != len(self.backends):
            raise BenchError(f"--backends names a backend twice: {','.join(self.backends)}")
        for height, width in self.sizes:
            if height <= 0 or width <= 0 or height % 8 or width % 8:
                raise BenchError(f"size {height}x{width} must be positive multiples of 8, e.g. 64x64")
        for name, value, least in (("steps", self.steps, 1), ("batch", self.batch, 1), ("repeats", self.repeats, 1),
                                   ("warmup", self.warmup, 0), ("cfg-repeats", self.cfg_repeats or 0, 0)):
            if value < least:
                raise BenchError(f"--{name} must be >= {least}, got {value}")

    @property
    def cfg_runs(self) -> int:
        """How many sag_scale=0 runs measure the SAG overhead (none when SAG is off anyway)."""
        if self.sag_scale <= 0:
            return 0
        return self.repeats if self.cfg_repeats is None else self.cfg_repeats

    def command(self) -> str:
        """The `sagrt bench` command line that reproduces this measurement."""
        parts = ["sagrt", "bench", "--model", self.model, "--backends", ",".join(self.backends),
                 "--size", ",".join(f"{h}x{w}" for h, w in self.sizes), "--steps", str(self.steps),
                 "--batch", str(self.batch), "--repeats", str(self.repeats), "--warmup", str(self.warmup),
                 "--guidance-scale", f"{self.guidance_scale:g}", "--sag-scale", f"{self.sag_scale:g}",
                 "--seed", str(self.seed)]
        if self.cfg_repeats is not None:
            parts += ["--cfg-repeats", str(self.cfg_repeats)]
        if self.scheduler:
            parts += ["--scheduler", self.scheduler]
        if self.device:
            parts += ["--device", self.device]
        if self.baseline_precision != "fp32":
            parts += ["--baseline-dtype", self.baseline_precision]
        if self.prompt != PROMPT:
            parts += ["--prompt", self.prompt]
        return shlex.join(parts)

    def case(self, backend: str, size: tuple[int, int]) -> dict:
        """What one worker process measures."""
        case = asdict(self)
        del case["backends"], case["sizes"]
        return dict(case, backend=backend, height=size[0], width=size[1], cfg_runs=self.cfg_runs)


def parse_backend_spec(spec: str) -> tuple[str, str | None]:
    """'openvino:bf16' -> ('openvino', 'bf16'); 'onnxruntime' -> ('onnxruntime', None): a backend and, after a
    colon, one of the precisions it runs."""
    name, _, precision = spec.strip().partition(":")
    if name not in BACKEND_NAMES:
        raise BenchError(f"unknown backend {name!r}: choose from {', '.join(BACKEND_NAMES)} (the {BASELINE} "
                         f"baseline always runs)")
    if precision and (name == "auto" or precision not in REGISTRY[name].precisions):
        runs = "a precision only with a named backend" if name == "auto" else \
            f"in {' or '.join(REGISTRY[name].precisions)}"
        raise BenchError(f"backend {spec!r}: {name} runs {runs}, e.g. openvino:bf16")
    return name, precision or None


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x64,128x96' -> ((64, 64), (128, 96))."""
    sizes = []
    for part in text.split(","):
        try:
            height, width = (int(side) for side in part.strip().lower().split("x"))
        except ValueError:
            raise BenchError(f"size {part!r} must be HxW in pixels, e.g. 64x64 or 512x512,768x512") from None
        sizes.append((height, width))
    return tuple(sizes)
