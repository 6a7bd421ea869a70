"""ONNX -> TensorRT engines for the GPU at hand, with the TensorRT Python API (no shelling out).

One engine per exported network (unet, text_encoder, vae_decoder); the UNet has two optimisation
profiles (tuned for batch 2B and B), the others one (engine/profiles.py). Networks are strongly typed:
precision comes from the exported graph, whose casts keep normalisations and the SAG score path in
float32 also in fp16 exports (weak typing is deprecated since TensorRT 10.12 and removed in 11). Engines and the timing cache are written atomically; the
manifest is written last, so a folder with a manifest is a finished build.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sagrt import __version__
from sagrt.engine.packages import cuda_major_mismatch, tensorrt_cuda_major
from sagrt.engine.profiles import BuildConfig, build_profiles, cache_key, engine_filename
from sagrt.errors import SagrtError
from sagrt.export import artifacts
from sagrt.export.artifacts import MANIFEST, artifact_dir, read_manifest, write_bytes_atomic, write_manifest
from sagrt.export.onnx_export import export_model
from sagrt.networks import MID_BLOCK_LAYER
from sagrt.runners import ModelInfo

TENSORRT_MIN = (10, 1)  # device_memory_size_v2 and set_device_memory(ptr, size) arrived in 10.1
INSTALL = "on a machine with an NVIDIA GPU and CUDA, install it with: pip install 'sagrt[tensorrt]'"
COPIED_FOLDERS = ("tokenizer", "scheduler")  # what the loop needs besides engines, copied from the export


class TensorRTUnavailable(SagrtError):
    """TensorRT or a CUDA GPU is missing here."""


class BuildError(SagrtError):
    """An export TensorRT cannot build from; the message says how to redo it."""


# ---- what this machine has ---------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def tensorrt_missing() -> list[str]:
    """Why TensorRT engines cannot run here; empty when they can."""
    reasons = []
    try:
        import tensorrt
    except (ImportError, OSError):
        reasons.append("TensorRT is not installed")
    else:
        if _version(tensorrt.__version__) < TENSORRT_MIN:
            reasons.append(f"TensorRT {tensorrt.__version__} is older than {'.'.join(map(str, TENSORRT_MIN))}")
        reasons.append(cuda_major_mismatch(tensorrt_cuda_major(), torch.version.cuda))
    return [reason for reason in reasons + [cuda_missing()] if reason]


def cuda_missing() -> str | None:
    """Why torch cannot run on a CUDA GPU here; None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def require_tensorrt(what: str):
    """The tensorrt module, or a one-line error saying what is missing and how to install it."""
    reasons = tensorrt_missing()
    if reasons:
        raise TensorRTUnavailable(f"{what} needs TensorRT and an NVIDIA GPU, but {' and '.join(reasons)}; {INSTALL}")
    import tensorrt

    return tensorrt


def this_platform(trt, device: int | None = None) -> dict:
    """What an engine is tied to: GPU model, compute capability and TensorRT version."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": trt.__version__}


def onnx_sha256(export: dict, network: str) -> str:
    """What a network's engine is built from, as recorded in the export manifest: the graph's sha256, followed by
    its external weights file's where the weights sit beside the graph (the graph alone only points at them, so
    new weights in the same architecture would keep its hash)."""
    files = export["files"]
    return "+".join(files[name]["sha256"] for name in (f"{network}.onnx", f"{network}.onnx.data") if name in files)


# ---- paths and the rebuild command -------------------------------------------------------------
def default_engine_dir(fingerprint: str, key: str) -> Path:
    """Where engines live when no --out is given: the one place engine paths come from artifacts."""

    return Path(artifact_dir(fingerprint, "tensorrt", key))


def rebuild_command(manifest: dict, engine_dir: str | Path, config: BuildConfig | None = None) -> str:
    """The `sagrt build` command that remakes the engines of a manifest (with `config` if given)."""
    config = config or BuildConfig.from_dict(manifest["build_config"])
    layer = manifest.get("sag_layer", MID_BLOCK_LAYER)
    parts = ["sagrt build --model", shlex.quote(str(manifest["model_source"])), "--out", shlex.quote(str(engine_dir)),
             config.cli_args()]
    parts += [f"--sag-layer {layer}"] if layer != MID_BLOCK_LAYER else []
    return " ".join(parts + ["--force"])


# ---- progress ----------------------------------------------------------------------------------
class BuildProgress:
    """One progress bar per TensorRT optimiser phase, nested as TensorRT nests them.
    TensorRT calls this from its builder threads, hence the lock."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self.bars: dict[str, tqdm] = {}
        self.lock = threading.Lock()

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        with self.lock:
            self.bars[phase] = tqdm(total=steps, desc=f"{self.label}: {phase}", position=len(self.bars),
                                    leave=parent is None, disable=not self.enabled)

    def step_complete(self, phase: str, step: int) -> bool:
        with self.lock:
            bar = self.bars.get(phase)
            if bar is not None:
                bar.update(step + 1 - bar.n)
        return True  # False would cancel the build

    def phase_finish(self, phase: str) -> None:
        with self.lock:
            bar = self.bars.pop(phase, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        with self.lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()


def progress_monitor(trt, display: BuildProgress):
    """Adapts BuildProgress to TensorRT's IProgressMonitor interface (TensorRT >= 10)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            display.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return display.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            display.phase_finish(phase_name)

    return Monitor()


# ---- the build ---------------------------------------------------------------------------------
def check_output_dtypes(network: str, outputs: dict[str, str]) -> None:
    """The UNet must hand SAG its attention score, in float32 (TensorRT dtype names: FLOAT, HALF...)."""
    if network != "unet":
        return
    if "attn_score" not in outputs:
        raise BuildError(f"the exported UNet has no attn_score output (outputs: {', '.join(outputs)}): "
                         "re-export it with: sagrt export --force")
    if outputs["attn_score"] != "FLOAT":
        raise BuildError(f"the exported UNet's attn_score is {outputs['attn_score']}, not float32: re-export it "
                         "with a sagrt that keeps the score path in float32 (sagrt export --force)")


@dataclass(frozen=True)
class BuildPlan:
    """What a build will make, decided from the export manifest, the config and this machine."""

    export_dir: Path
    export: dict
    config: BuildConfig  # resolved against the model
    platform: dict
    key: str
    profiles: dict[str, list[dict]]  # network -> its optimisation profiles, in engine order

    @classmethod
    def make(cls, export_dir: str | Path, config: BuildConfig, platform: dict) -> "BuildPlan":
        export_dir = Path(export_dir)
        export = read_manifest(export_dir)
        if not export or export.get("kind") != "onnx":
            raise BuildError(f"{export_dir} holds no sagrt ONNX export (manifest.json missing or not an export): "
                             "make one with: sagrt export --model M")
        info = ModelInfo(**export["model_info"])
        config = config.resolved(info)
        if export["precision"] != config.precision:
            raise BuildError(f"the export in {export_dir} is {export['precision']} but the build asks for "
                             f"{config.precision}: make an {config.precision} export (sagrt export --precision {config.precision})")
        onnx = {network: onnx_sha256(export, network) for network in export["networks"]}
        gpu = {k: platform[k] for k in ("gpu", "compute_capability")}
        key = cache_key(config, platform["tensorrt_version"], onnx, gpu)
        return cls(export_dir, export, config, platform, key, build_profiles(export, config, info.vae_scale_factor))

    def engine_file(self, network: str) -> str:
        return engine_filename(network, self.platform["tensorrt_version"])

    def is_built(self, engine_dir: Path) -> bool:
        """A finished build of this plan is in `engine_dir` (same key, every engine file whole)."""
        manifest = read_manifest(engine_dir)
        if not manifest or manifest.get("cache_key") != self.key:
            return False
        return all(artifacts.member(engine_dir, e["file"]).is_file()
                   and artifacts.member(engine_dir, e["file"]).stat().st_size == e["bytes"]
                   for e in manifest["engines"].values())

    def manifest(self, engine_files: dict[str, dict]) -> dict:

        export = self.export
        return {
            "kind": "tensorrt", "sagrt_version": __version__, "cache_key": self.key, **self.platform,
            "precision": self.config.precision, "build_config": self.config.to_dict(),
            "model_fingerprint": export["model_fingerprint"], "model_source": export["model_source"],
            "model_info": export["model_info"], "sag_layer": export["sag_layer"],
            "export_dir": str(self.export_dir.resolve()),
            "onnx": {n: {"file": f"{n}.onnx", "sha256": onnx_sha256(export, n)} for n in export["networks"]},
            "engines": {n: {**engine_files[n], **export["networks"][n], "profiles": self.profiles[n]}
                        for n in export["networks"]},
        }


def load_timing_cache(trt, build_config, path: Path, own: bool):
    """The builder's timing cache, read from `path` when it exists. A cache another GPU or TensorRT wrote is
    refused when the user named it (it is theirs to keep), and started afresh when it is sagrt's own file in
    the engine folder (it belonged to the engines being rebuilt)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = build_config.create_timing_cache(data)
    if cache is not None and build_config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if not own:
        raise BuildError(f"timing cache {path} was written by another GPU or TensorRT version (or is damaged), "
                         f"and sagrt will not overwrite it: pass another --timing-cache FILE, or delete it")
    cache = build_config.create_timing_cache(b"")
    build_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def configure(trt, build_config, config: BuildConfig) -> None:
    """Builder settings from the BuildConfig."""
    build_config.builder_optimization_level = config.optimization_level
    if config.precision == "fp32":
        build_config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 engines are for parity with torch
    if config.workspace_gib:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 2**30))
    resize = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)  # TensorRT >= 10.10
    if resize is not None:
        # scratch memory sized for the shapes of a call (update_device_memory_size_for_shapes), not the profile max
        build_config.set_preview_feature(resize, True)


def parse_onnx(trt, logger, onnx_path: Path):
    """(builder, network, parser): `onnx_path` parsed into a strongly typed network (the parser must outlive the
    network's use, as it owns the weights it imported)."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external data files are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors[0] if errors else 'unknown error'}")
    return builder, network, parser


def network_io(network) -> dict[str, dict[str, str]]:
    """{"inputs": {name: TensorRT dtype name}, "outputs": {...}} of a parsed network."""
    return {"inputs": {network.get_input(i).name: network.get_input(i).dtype.name for i in range(network.num_inputs)},
            "outputs": {network.get_output(i).name: network.get_output(i).dtype.name
                        for i in range(network.num_outputs)}}


def build_engine(trt, logger, onnx_path: Path, engine_path: Path, profiles: list[dict], config: BuildConfig,
                 timing_cache: Path, progress: bool, own_timing_cache: bool = True) -> str:
    """Parses one ONNX file into a strongly typed network, writes its engine atomically; returns its sha256."""
    network_name = onnx_path.stem
    builder, network, parser = parse_onnx(trt, logger, onnx_path)
    check_output_dtypes(network_name, network_io(network)["outputs"])

    build_config = builder.create_builder_config()
    configure(trt, build_config, config)
    for profile in profiles:  # in order: the runner selects them by index (engine/profiles.py pick_profile)
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            optimization_profile.set_shape(name, low, opt, high)
        build_config.add_optimization_profile(optimization_profile)
    load_timing_cache(trt, build_config, timing_cache, own_timing_cache)
    display = BuildProgress(f"build {network_name}", enabled=progress)
    monitor = progress_monitor(trt, display)
    build_config.progress_monitor = monitor
    try:
        plan = builder.build_serialized_network(network, build_config)
    finally:
        display.close()
    if plan is None:
        raise BuildError(f"TensorRT could not build the {network_name} engine (its log above says why)")
    write_bytes_atomic(engine_path, plan)
    write_bytes_atomic(timing_cache, bytes(build_config.get_timing_cache().serialize()))
    return hashlib.sha256(memoryview(plan)).hexdigest()  # from memory: the engine file is not read back


def copy_folder_atomic(source: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_engines(export_dir: str | Path, config: BuildConfig, engine_dir: str | Path | None = None, *,
                  force: bool = False, progress: bool = True) -> Path:
    """Builds (or reuses) the engines of one export for this GPU; returns their folder."""
    from sagrt.export.onnx_export import verify_export

    trt = require_tensorrt("building TensorRT engines")
    verify_export(export_dir, full=True)  # every byte, whatever the stat record says: engines outlive the export
    plan = BuildPlan.make(export_dir, config, this_platform(trt))
    engine_dir = Path(engine_dir) if engine_dir else default_engine_dir(plan.export["model_fingerprint"], plan.key)
    engine_dir.mkdir(parents=True, exist_ok=True)
    if not force and plan.is_built(engine_dir):
        if progress:
            print(f"TensorRT engines up to date in {engine_dir}")
        return engine_dir
    claim_engine_dir(engine_dir)
    (engine_dir / MANIFEST).unlink(missing_ok=True)  # a half-rebuilt folder must not look finished
    timing_cache = Path(plan.config.timing_cache) if plan.config.timing_cache else engine_dir / "timing.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    engine_files = {}
    for network, profiles in plan.profiles.items():
        path, start = engine_dir / plan.engine_file(network), time.perf_counter()
        digest = build_engine(trt, logger, plan.export_dir / f"{network}.onnx", path, profiles, plan.config,
                              timing_cache, progress, own_timing_cache=not plan.config.timing_cache)
        seconds, size = time.perf_counter() - start, path.stat().st_size
        engine_files[network] = {"file": path.name, "sha256": digest, "bytes": size, "build_seconds": round(seconds, 1)}
        if progress:
            print(f"built {path.name}: {size / 2**20:.1f} MiB in {seconds:.1f} s")
    for folder in COPIED_FOLDERS:
        copy_folder_atomic(plan.export_dir / folder, engine_dir / folder)
    write_manifest(engine_dir, plan.manifest(engine_files))
    (engine_dir / artifacts.CLAIM).unlink(missing_ok=True)
    return engine_dir


def claim_engine_dir(engine_dir: Path) -> None:
    """Refuses a folder that holds files but neither a TensorRT manifest of sagrt nor its claim (a folder sagrt
    did not make never loses a file to a build), then claims it for the build."""
    manifest = read_manifest(engine_dir)
    ours = (isinstance(manifest, dict) and manifest.get("kind") == "tensorrt") or (engine_dir / artifacts.CLAIM).exists()
    foreign = [] if ours else artifacts.foreign_entries(engine_dir, f".{engine_dir.name}.")
    if foreign:
        raise BuildError(f"{engine_dir} holds files sagrt did not write, e.g. {foreign[0]!r}: build into a new or "
                         f"empty folder (sagrt never removes files it did not write)")
    artifacts.write_claim(engine_dir, "tensorrt", [])


def build_for_model(model, config: BuildConfig, out: str | Path | None = None, *, sag_layer: str = MID_BLOCK_LAYER,
                    force: bool = False, progress: bool = True) -> Path:
    """Exports `model` if needed (reusing a matching export), then builds its engines."""
    require_tensorrt("building TensorRT engines")  # before any export work

    export_dir = export_model(model, precision=config.precision, sag_layer=sag_layer, progress=progress)
    return build_engines(export_dir, config, out, force=force, progress=progress)
