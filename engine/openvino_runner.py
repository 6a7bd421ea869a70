"""OpenVINO runners: the three calls of sagrt.runners.Runners on OpenVINO's CPU plugin, from the same ONNX export
ONNX Runtime runs, in fp32 or (on CPUs with bfloat16 instructions) bf16.

bf16 is OpenVINO's inference precision hint: the graphs and their inputs and outputs stay float32, the CPU plugin
runs the heavy layers (convolutions, matmuls) in bf16 and keeps Softmax and the reductions at a graph output in
f32; attn_score therefore leaves the UNet in float32, computed in f32 from the SAG layer's f32 softmax
(`sag_layer_precisions` reads that back from the compiled graph, and the tests check it). sagrt adds one thing:
the timestep embedding's phases (timestep x frequencies) stay f32 (`phases_from_input`, `keep_float32`).
Measurements behind both choices: benchmarks/RESULTS-openvino.md.

Each network is compiled for the input shapes of its call, on first use (static shapes run faster than one dynamic
compilation), and cached beside the export (`openvino-<version>-<precision>/`, one blob per network and shapes with
a manifest of hashes): a later load imports them instead of compiling again.
"""

from __future__ import annotations

import io
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from sagrt import __version__
from sagrt.engine.onnxruntime_runner import OrtRunners
from sagrt.errors import SagrtError
from sagrt.export import artifacts, specs
from sagrt.export.onnx_export import verify_export
from sagrt.networks import NETWORKS, TORCH_DTYPES
from sagrt.runners import ModelInfo

OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # sagrt name -> OpenVINO INFERENCE_PRECISION_HINT
BACKEND = "openvino"
CACHE_KIND = "openvino-compiled"


class OpenVinoError(SagrtError):
    """OpenVINO missing, a precision this CPU cannot run, a graph this OpenVINO cannot read, or a damaged cache."""


def openvino_version() -> str:
    import openvino

    return openvino.get_version().split("-")[0]


def new_core():
    try:
        import openvino
    except ImportError:
        raise OpenVinoError('the openvino backend needs OpenVINO: pip install ".[openvino]"') from None
    return openvino.Core()


def check_precision(precision: str, capabilities) -> None:
    """Refuses a precision the CPU cannot run (`capabilities`: the CPU plugin's OPTIMIZATION_CAPABILITIES)."""
    if precision not in OV_PRECISIONS:
        raise OpenVinoError(f"unknown precision {precision!r} for openvino: use {' or '.join(OV_PRECISIONS)}")
    if precision == "bf16" and "BF16" not in capabilities:
        raise OpenVinoError(f"this CPU has no bfloat16 support (OpenVINO reports {', '.join(capabilities)}): "
                            f"use --precision fp32")


def reason(err: Exception) -> str:
    """What an OpenVINO exception says went wrong: its last non-empty line (the lines above name source files)."""
    lines = [line.strip().lstrip("- ").strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def read_graph(core, path: Path):
    """The ONNX graph as an OpenVINO model; a graph this OpenVINO cannot read is a one-line OpenVinoError."""
    try:
        return core.read_model(str(path))
    except RuntimeError as err:
        raise OpenVinoError(f"OpenVINO {openvino_version()} cannot read {path.name} ({reason(err)}): upgrade it "
                            f"(pip install -U openvino) or use --backend onnxruntime") from None


def compile_graph(core, model, config: dict, filename: str):
    try:
        return core.compile_model(model, "CPU", config)
    except RuntimeError as err:
        raise OpenVinoError(f"OpenVINO {openvino_version()} cannot compile {filename} for this CPU "
                            f"({reason(err)}): upgrade it (pip install -U openvino) or use --backend "
                            f"onnxruntime") from None


def onnx_scope(layer: str) -> str:
    """The name prefix torch.onnx.export gives the nodes of a UNet submodule:
    'mid_block.attentions.0.transformer_blocks.0.attn1' -> '/unet/mid_block/attentions.0/transformer_blocks.0/attn1'."""
    parts: list[str] = []
    for part in layer.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/unet/" + "/".join(parts)


DATA_MOVEMENT = ("Convert", "Unsqueeze", "Reshape", "Broadcast")  # ops that only move or cast their first input
PHASE_NODE = "sagrt/timestep_phase"
KEEP_PRECISION = "dynamic:f16,bf16"  # DisablePrecisionConversion: from any type to f16 or bf16 (the CPU checks f16)


def phases_from_input(model) -> int:
    """Rewires every Sin/Cos whose argument is input x constant, the input reaching the Multiply through data
    movement only (the UNet's timestep embedding: timestep -> Expand to the batch -> Unsqueeze -> x frequencies),
    to a new Multiply of the input itself by the constant. The CPU plugin keeps an elementwise node fed by a graph
    input at the input's f32, but rounds the output of replaced data-movement nodes to bf16: a timestep of 999
    would reach the embedding as 1000. The timestep is one value for the whole batch, so the phases are computed
    at batch 1 and broadcast by the layers that add the embedding. Returns how many Sin/Cos were rewired."""
    import openvino as ov

    rewired, made = 0, {}
    for op in [op for op in model.get_ops() if op.get_type_name() in ("Sin", "Cos")]:
        product = op.input_value(0).get_node()
        if product.get_type_name() != "Multiply":
            continue
        values = product.input_values()
        constants = [v for v in values if v.get_node().get_type_name() == "Constant"]
        source = next((v for v in values if v.get_node().get_type_name() != "Constant"), None)
        while source is not None and source.get_node().get_type_name() in DATA_MOVEMENT:
            source = source.get_node().input_value(0)
        if len(constants) != 1 or source is None or source.get_node().get_type_name() != "Parameter":
            continue
        key = (source.get_node().get_friendly_name(), constants[0].get_node().get_friendly_name())
        if key not in made:
            made[key] = ov.opset13.multiply(source, constants[0])
            made[key].set_friendly_name(f"{PHASE_NODE}_{len(made)}")
        op.input(0).replace_source_output(made[key].output(0))
        rewired += 1
    if rewired:
        model.validate_nodes_and_infer_types()
    return rewired


def periodic_inputs(model) -> set[str]:
    """Names of the nodes that compute the arguments of the graph's Sin and Cos (the UNet's timestep embedding:
    timestep x frequencies) from its inputs. In bf16 a timestep near 1000 times a frequency keeps 8 bits of
    mantissa, a phase error of several radians, so these stay float32."""
    names, stack = set(), [op for op in model.get_ops() if op.get_type_name() in ("Sin", "Cos")]
    while stack:
        op = stack.pop()
        if op.get_type_name() in ("Constant", "Parameter") or op.get_friendly_name() in names:
            continue
        names.add(op.get_friendly_name())
        stack.extend(value.get_node() for value in op.input_values())
    return names


def keep_float32(core, model, names: set[str], scratch: Path):
    """`model` with OpenVINO's DisablePrecisionConversion runtime attribute on the nodes `names`, so the CPU plugin
    runs them in f32 under a bf16 inference precision. Python cannot create that attribute; OpenVINO's IR reader
    can: the model goes through an IR in `scratch` whose layers get the attribute."""
    import openvino as ov
    import xml.etree.ElementTree as ET

    xml_path = scratch / "marked.xml"
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    tree = ET.parse(xml_path)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in names:
            rt_info = layer.find("rt_info")
            if rt_info is None:
                rt_info = ET.SubElement(layer, "rt_info")
            ET.SubElement(rt_info, "attribute", name="DisablePrecisionConversion", version="0", value=KEEP_PRECISION)
    tree.write(xml_path)
    return core.read_model(str(xml_path))


class CompiledCache:
    """Compiled networks of one export, precision and OpenVINO version: `<export>/openvino-<version>-<precision>/`
    holds one <key>.blob per compiled network and input shapes (`shape_key`) with a manifest naming the export
    files they were compiled from, the CPU and each blob's size and sha256. Every listed blob is checked when the
    cache is opened; one that no longer matches is refused (delete the folder to recompile). A cache for other
    export files or another CPU is recompiled."""

    def __init__(self, export_dir: Path, export_manifest: dict, precision: str, files: dict[str, str], cpu: str):
        self.folder = export_dir / f"openvino-{openvino_version()}-{precision}"
        self.wanted = {"kind": CACHE_KIND, "openvino_version": openvino_version(), "precision": precision,
                       "cpu": cpu,
                       "sources": {name: entry["sha256"] for name, entry in export_manifest["files"].items()
                                   if any(name == f or name.startswith(f"{f}.") for f in files.values())}}
        self.files = self.verified()

    def entries(self) -> dict | None:
        """The blobs the manifest lists, if it was made for this export, precision, OpenVINO and CPU, else None."""
        manifest = artifacts.read_manifest(self.folder)
        if manifest is None or artifacts.manifest_differences(manifest, self.wanted):
            return None
        return manifest.get("files", {})

    def verified(self) -> dict:
        """The manifest's blobs, each checked for its size and sha256 (hashes are remembered per file stat)."""
        entries = self.entries() or {}
        for name, entry in sorted(entries.items()):
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise OpenVinoError(f"compiled OpenVINO cache {path} is missing or truncated: delete {self.folder} "
                                    f"(it is recompiled on the next load)")
        digests = artifacts.recorded_sha256s(self.folder, sorted(entries))
        for name, entry in sorted(entries.items()):
            if digests[name] != entry["sha256"]:
                raise OpenVinoError(f"compiled OpenVINO cache {self.folder / name} is corrupted (sha256 differs "
                                    f"from its manifest): delete {self.folder} (it is recompiled on the next load)")
        return entries

    def load(self, core, key: str, config: dict):
        """The compiled network cached under `key`, or None when the cache has none."""
        name = f"{key}.blob"
        if name not in self.files:
            return None
        try:
            return core.import_model((self.folder / name).read_bytes(), "CPU", config)
        except RuntimeError as err:
            raise OpenVinoError(f"this OpenVINO cannot import the compiled cache {name} ({reason(err)}): "
                                f"delete {self.folder} (it is recompiled on the next load)") from None

    def save(self, key: str, compiled) -> None:
        """Adds one blob: written atomically, then the manifest that lists it (a blob it replaces is first
        unlisted). Blobs of a manifest made for something else are removed. Best effort: a folder sagrt cannot
        write is skipped."""
        name = f"{key}.blob"
        try:
            self.folder.mkdir(exist_ok=True)
            files = self.entries()
            if files is None:
                stale = artifacts.read_manifest(self.folder) or {}
                (self.folder / artifacts.MANIFEST).unlink(missing_ok=True)
                for old in stale.get("files", {}):
                    artifacts.member(self.folder, old).unlink(missing_ok=True)
                files = {}
            elif files.pop(name, None) is not None:  # the old manifest must not vouch for the new blob
                self.write_manifest(files)
            stream = io.BytesIO()
            compiled.export_model(stream)
            artifacts.write_bytes_atomic(self.folder / name, stream.getvalue())
            files[name] = {"sha256": artifacts.recorded_sha256s(self.folder, [name])[name],
                           "bytes": (self.folder / name).stat().st_size}
            self.write_manifest(files)
            self.files = files
        except OSError:
            return

    def write_manifest(self, files: dict) -> None:
        artifacts.write_manifest(self.folder, {**self.wanted, "files": files,
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def shape_key(network: str, arrays: dict[str, np.ndarray]) -> str:
    """The name of one static compilation: network and input shapes, e.g. 'unet-2x4x32x32-1-2x77x256'."""
    return "-".join([network] + ["x".join(map(str, array.shape)) for array in arrays.values()])


class OvRunners(OrtRunners):
    """Runners over OpenVINO compilations of an export folder's graphs (see export.onnx_export). The three calls
    are OrtRunners' (same graphs, same checks); only the compilations and `run` differ.

    With `static_shapes` (the default) each network is compiled for the input shapes of its call, on first use
    (a static UNet call takes 13-20% less time than the dynamic compilation's: benchmarks/RESULTS-openvino.md);
    the last `shapes_kept` compilations per network stay in memory, and every one is cached on disk."""

    name = BACKEND
    thread_safe = False  # one infer request per compilation, compiled on first use: the pipeline serializes calls
    host_threads = 1

    def __init__(self, export_dir: str | Path, precision: str = "fp32", *, wanted: dict | None = None,
                 model: str | None = None, threads: int | None = None, cache: bool = True,
                 static_shapes: bool = True, shapes_kept: int = 4, progress: bool = True):
        """`precision`: fp32 or bf16 (OpenVINO's inference precision; the graphs are the fp32 export's).
        `threads`: OpenVINO's inference threads (default: OpenVINO's choice). `cache`: import compiled networks
        from, and save them to, the cache folder beside the export. `static_shapes`: compile per input shapes
        (False: one dynamic compilation per network serves every shape). `progress`: one line on stderr per
        compilation (seconds each, on the first call at new shapes)."""
        if shapes_kept < 1:
            raise OpenVinoError(f"shapes_kept must be at least 1, got {shapes_kept}")
        self.core = new_core()
        check_precision(precision, self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        self.export_dir, self.precision = Path(export_dir), precision
        self.static_shapes, self.shapes_kept, self.progress = static_shapes, shapes_kept, progress
        self.manifest = verify_export(self.export_dir, {"sagrt_version": __version__, "precision": "fp32",
                                                        **(wanted or {})}, model)
        self.info = ModelInfo(**self.manifest["model_info"])
        self.specs = {name: specs.NetworkSpec.from_table(name, self.manifest["networks"][name]) for name in NETWORKS}
        self.map_downsamplings = self.manifest["sag_map_downsamplings"]
        self.device, self.dtype, self.io_binding = torch.device("cpu"), torch.float32, False
        self.files = {name: spec.filename for name, spec in self.specs.items()}  # portable graphs, no com.microsoft
        for filename in self.files.values():  # a graph this OpenVINO cannot read is refused now, not mid-generation
            read_graph(self.core, self.export_dir / filename)
        self.config = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        cpu = f"{self.core.get_property('CPU', 'FULL_DEVICE_NAME')} ({platform.machine()})"
        self.cache = CompiledCache(self.export_dir, self.manifest, precision, self.files, cpu) if cache else None
        self.loaded: dict[str, OrderedDict] = {name: OrderedDict() for name in NETWORKS}  # key -> (compiled, request)
        self.imported: list[str] = []  # keys imported from the cache, in order

    def compiled_for(self, network: str, arrays: dict[str, np.ndarray]):
        """(compiled network, its infer request) for these inputs: in memory, imported from the cache, or
        compiled now (and cached)."""
        key = shape_key(network, arrays) if self.static_shapes else network
        loaded = self.loaded[network]
        if key not in loaded:
            compiled = self.cache.load(self.core, key, self.config) if self.cache else None
            if compiled is not None:
                self.imported.append(key)
            else:
                start = time.perf_counter()
                compiled = self.compile(network, {name: array.shape for name, array in arrays.items()})
                if self.cache:
                    self.cache.save(key, compiled)
                if self.progress:
                    print(f"openvino: compiled {key} ({self.precision}) in {time.perf_counter() - start:.1f} s"
                          f"{', cached' if self.cache else ''}", file=sys.stderr, flush=True)
            loaded[key] = (compiled, compiled.create_infer_request())
            while len(loaded) > self.shapes_kept:
                loaded.popitem(last=False)
        loaded.move_to_end(key)
        return loaded[key]

    def compile(self, network: str, shapes: dict[str, tuple]):
        """OpenVINO's compilation of one graph (for `shapes` under static_shapes); under bf16 the UNet's timestep
        embedding stays float32."""
        model = read_graph(self.core, self.export_dir / self.files[network])  # read again: no graph kept in memory
        if self.static_shapes:
            model.reshape({name: list(shape) for name, shape in shapes.items()})
        names = set()
        if self.precision == "bf16":
            phases_from_input(model)
            names = periodic_inputs(model)
        if names:
            with tempfile.TemporaryDirectory(prefix=".sagrt-openvino-") as scratch:
                model = keep_float32(self.core, model, names, Path(scratch))
                return compile_graph(self.core, model, self.config, self.files[network])
        return compile_graph(self.core, model, self.config, self.files[network])

    def run(self, network: str, feeds: dict[str, torch.Tensor], dims: dict[str, int],
            outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Runs one network on `feeds` (cast to the graph's input dtypes); returns float32/int CPU tensors that own
        their memory (the request's output buffers are reused by the next call)."""
        spec = self.specs[network]
        arrays = {t.name: np.ascontiguousarray(feeds[t.name].detach().cpu().to(TORCH_DTYPES[t.dtype]).numpy())
                  for t in spec.inputs}
        compiled, request = self.compiled_for(network, arrays)
        results = request.infer(arrays)  # keyed by output port; a port may carry several names
        return {t.name: torch.from_numpy(np.array(results[compiled.output(t.name)])) for t in spec.outputs
                if outputs is None or t.name in outputs}

    def last_compiled(self, network: str):
        """The network's most recently used compilation (after at least one call)."""
        if not self.loaded[network]:
            raise OpenVinoError(f"no {network} is compiled yet: it is compiled on its first call")
        return next(reversed(self.loaded[network].values()))[0]

    def sag_layer_precisions(self) -> dict[str, str]:
        """{node name: runtime precision} of the last used UNet compilation's nodes for the SAG layer's softmax
        and the attn_score output, read from OpenVINO's runtime graph."""
        scope = onnx_scope(self.manifest["sag_layer"]) + "/"
        found = {}
        for op in self.last_compiled("unet").get_runtime_model().get_ops():
            name, info = op.get_friendly_name(), op.get_rt_info()
            kind = info["layerType"].astype(str)
            if (kind == "Softmax" and name.startswith(scope)) or name == "attn_score":
                found[name] = info["runtimePrecision"].astype(str)
        return found

    def close(self) -> None:
        self.loaded = {name: OrderedDict() for name in NETWORKS}


def require_precision(precision: str) -> None:
    """Refuses, before any export is written, a precision this CPU cannot run."""
    check_precision(precision, new_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
