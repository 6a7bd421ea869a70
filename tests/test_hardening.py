"""Issue 11's probes as regression tests: no data loss, no file read or written outside the export folder,
every bad input one line on stderr with exit status 2, safe concurrent calls, bounds, non-finite values,
leftovers, full verification. Every CLI probe runs inside a sentinel tree that is hashed before and after."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sagrt.export import artifacts
from sagrt.export.onnx_export import ExportError, export_model, verify_export
from sagrt.runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent


# ---- helpers -------------------------------------------------------------------------------------
def tree_state(root: Path, skip=()) -> dict[str, str]:
    """relative path -> sha256 (files), link target (symlinks) or 'dir', for everything under `root` except the
    paths under `skip`."""
    state = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def make_sentinel(root: Path) -> Path:
    """A small tree of files a user cares about: every probe must leave it exactly as it was."""
    (root / "keep" / "tokenizer").mkdir(parents=True)
    (root / "keep" / "notes.txt").write_text("keep me\n")
    (root / "keep" / "tokenizer" / "vocab.json").write_text("{}\n")
    (root / "keep" / "weights.onnx.data").write_bytes(b"\0" * 64)
    (root / "secret.txt").write_text("not for sagrt\n")
    return root


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"sagrt {command}: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder with a sentinel tree, the cache inside it, and the process's cwd there."""
    work = make_sentinel(tmp_path / "work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("SAGRT_CACHE", str(tmp_path / "cache"))
    return work


# ---- 1. no data loss -----------------------------------------------------------------------------
def foreign_folder(root: Path) -> Path:
    folder = root / "D"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "notes.txt").write_text("keep\n")
    (folder / "other.onnx.data").write_text("keep\n")
    return folder


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_export_refuses_a_folder_sagrt_did_not_make(workspace, capsys, force):
    folder = foreign_folder(workspace)
    before = tree_state(workspace)
    assert main(["export", "--model", "tiny", "--out", str(folder), *force]) == 2
    assert "holds files sagrt did not write" in one_line_error(capsys, "export")
    assert tree_state(workspace) == before


def test_generate_refuses_a_foreign_export_dir(workspace, capsys):
    folder = foreign_folder(workspace)
    before = tree_state(workspace)
    assert main(["generate", "--model", "tiny", "--backend", "onnxruntime", "--export-dir", str(folder), "--steps", "1",
                 "--out", str(workspace / "images")]) == 2
    assert "sagrt did not write" in one_line_error(capsys, "generate")
    assert tree_state(workspace) == before


def test_forced_export_replaces_only_what_its_manifest_lists(tiny, tiny_onnx, tmp_path):
    folder = tmp_path / "export"
    export_model(tiny, folder, external_data=True, progress=False)
    (folder / "notes.txt").write_text("mine\n")
    (folder / "tokenizer" / "notes.txt").write_text("mine\n")
    (folder / "mine.onnx.data").write_text("mine\n")
    assert (folder / "text_encoder.onnx.data").exists()
    export_model(tiny, folder, force=True, external_data=False, progress=False)
    assert not (folder / "text_encoder.onnx.data").exists()  # sagrt's own, no longer part of the export
    for name in ("notes.txt", "tokenizer/notes.txt", "mine.onnx.data"):
        assert (folder / name).read_text() == "mine\n"
    verify_export(folder)


def test_a_replacement_that_died_can_be_redone(tiny, tiny_onnx, tmp_path):
    """Killed between removing the old manifest and writing the new one, the folder keeps sagrt's claim."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    artifacts.write_claim(folder, "onnx", artifacts.read_manifest(folder)["files"])
    (folder / artifacts.MANIFEST).unlink()
    export_model(tiny, folder, progress=False)
    verify_export(folder)
    assert not (folder / artifacts.CLAIM).exists()


def test_export_to_an_existing_file_is_one_line(workspace, capsys):
    before = tree_state(workspace)
    assert main(["export", "--out", str(workspace / "secret.txt")]) == 2
    assert "is an existing file" in one_line_error(capsys, "export")
    assert tree_state(workspace) == before


# ---- 2. paths from a manifest ----------------------------------------------------------------------
def tampered(tiny_onnx, tmp_path, change) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    manifest = artifacts.read_manifest(folder)
    change(folder, manifest)
    (folder / artifacts.MANIFEST).write_text(json.dumps(manifest))
    return folder


def listing(name, target: Path):
    """A manifest change that lists `name` with the right size and sha256 of `target`."""
    def change(folder, manifest):
        manifest["files"][name] = {"sha256": artifacts.sha256_file(target), "bytes": target.stat().st_size}
    return change


def fused_elsewhere(outside: Path):
    def change(folder, manifest):
        shutil.copy(folder / "unet_fused.onnx", outside)
        manifest["fused_attention_unet"] = os.path.relpath(outside, folder)
    return change


def symlinked_graph(outside: Path):
    def change(folder, manifest):
        shutil.move(folder / "vae_decoder.onnx", outside)
        (folder / "vae_decoder.onnx").symlink_to(outside)
    return change


def unlisted_fused(folder, manifest):
    shutil.copy(folder / "unet_fused.onnx", folder / "other.onnx")
    manifest["fused_attention_unet"] = "other.onnx"


@pytest.mark.parametrize("probe", ["dotdot", "absolute", "fused outside", "symlink out", "fused unlisted"])
def test_manifest_paths_stay_inside_the_folder(tiny_onnx, tmp_path, capsys, probe):
    outside = make_sentinel(tmp_path / "outside")
    secret = outside / "secret.txt"
    change = {"dotdot": listing("../outside/secret.txt", secret),
              "absolute": listing(str(secret), secret),
              "fused outside": fused_elsewhere(outside / "evil.onnx"),
              "symlink out": symlinked_graph(outside / "vae.onnx"),
              "fused unlisted": unlisted_fused}[probe]
    folder = tampered(tiny_onnx, tmp_path, change)
    before = tree_state(outside)
    with pytest.raises(ExportError, match="outside the folder|not a plain relative|without its sha256"):
        verify_export(folder)
    assert main(["generate", "--model", "tiny", "--backend", "onnxruntime", "--export-dir", str(folder), "--steps", "1",
                 "--out", str(tmp_path / "images")]) == 2
    one_line_error(capsys, "generate")
    assert tree_state(outside) == before


def test_graph_reading_unlisted_weights_is_refused(tiny, tmp_path):
    """A graph whose external data points at a file the manifest does not list (here outside the folder)."""
    import onnx

    folder = export_model(tiny, tmp_path / "export", progress=False)
    graph = onnx.load(str(folder / "unet.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../stolen.data"
    onnx.save(graph, str(folder / "unet.onnx"))
    manifest = artifacts.read_manifest(folder)
    manifest["files"]["unet.onnx"] = {"sha256": artifacts.sha256_file(folder / "unet.onnx"),
                                      "bytes": (folder / "unet.onnx").stat().st_size}
    artifacts.write_manifest(folder, manifest)
    with pytest.raises(ExportError, match="reads weights from '../stolen.data'"):
        verify_export(folder, full=True)


# ---- 7. leftovers --------------------------------------------------------------------------------
def test_stale_staging_is_removed_and_live_staging_kept(tiny, tiny_onnx, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    dead = folder / ".export-dead"
    dead.mkdir()
    (dead / artifacts.STAGING_LOCK).touch()  # its writer is gone: nobody holds the lock
    (dead / "unet.onnx").write_bytes(b"x" * 1000)
    with artifacts.staging_dir(folder, ".export-") as live:
        removed = artifacts.remove_stale_staging(folder, ".export-")
        assert removed == [dead] and live.is_dir() and not dead.exists()
    assert not live.exists()


def test_staging_of_a_killed_process_is_removed_by_the_next_export(tiny, tiny_onnx, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    code = ("import sys, time; from sagrt.export import artifacts\n"
            "with artifacts.staging_dir(sys.argv[1], '.export-') as s:\n"
            "    (s / 'unet.onnx').write_bytes(b'x' * 1000); print(s, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    staging = Path(child.stdout.readline().strip())
    assert staging.is_dir()
    assert artifacts.remove_stale_staging(folder, ".export-") == []  # alive: kept
    child.kill()  # kill -9: no cleanup runs
    child.wait()
    assert staging.is_dir()
    export_model(tiny, folder, force=True, progress=False)
    assert not staging.exists()


def test_failed_export_leaves_no_empty_folder(tiny, tmp_path):
    target = tmp_path / "new" / "deeper"
    with pytest.raises(Exception, match="SAG layer"):
        export_model(tiny, target, sag_layer="down_blocks.9.attentions.0.transformer_blocks.0.attn1", progress=False)
    assert not (tmp_path / "new").exists()


def test_sigterm_during_export_cleans_up(tmp_path):
    target = tmp_path / "sig" / "export"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "sagrt.runtime.cli", "export", "--out", str(target)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(target.glob(".export-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(target.glob(".export-*")), "the export never started staging"
    child.send_signal(signal.SIGTERM)
    code, err = child.wait(timeout=120), child.stderr.read()
    assert code == 130 and "interrupted" in err, (code, err)
    assert not (tmp_path / "sig").exists(), list((tmp_path / "sig").rglob("*"))


# ---- 3. concurrent calls ---------------------------------------------------------------------------
def tiny_pipeline(runners, tiny, scheduler="ddim"):
    from sagrt.runtime import SAGPipeline
    from sagrt.runners import ModelInfo
    from sagrt.runtime.schedulers import make_scheduler

    pipe = SAGPipeline(runners, tiny.tokenizer, make_scheduler(scheduler, tiny.scheduler.config), ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_of(pipe, steps, seed=0, **kwargs):
    return pipe("a cat", height=64, width=64, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_second_call_on_a_busy_pipeline_is_refused_and_the_first_is_right(tiny):
    from sagrt.runtime.pipeline import PipelineBusyError
    from sagrt.runtime.torch_runners import TorchRunners

    pipe = tiny_pipeline(TorchRunners(tiny), tiny)
    reference = latents_of(pipe, 2)
    started, release, result = threading.Event(), threading.Event(), {}

    def hold(step, t, latents):
        started.set()
        release.wait(30)

    worker = threading.Thread(target=lambda: result.setdefault("x", latents_of(pipe, 2, callback=hold)))
    worker.start()
    assert started.wait(30)
    with pytest.raises(PipelineBusyError, match="already running a call"):
        latents_of(pipe, 2)
    with pytest.raises(PipelineBusyError):  # a second pipeline on the same scheduler object is refused too
        other = tiny_pipeline(TorchRunners(tiny), tiny)
        other.scheduler = pipe.scheduler
        latents_of(other, 2)
    release.set()
    worker.join(60)
    assert torch.equal(result["x"], reference)
    assert torch.equal(latents_of(pipe, 2), reference)  # free again


def test_a_callback_calling_the_pipeline_again_is_refused(tiny):
    from sagrt.runtime.pipeline import PipelineBusyError
    from sagrt.runtime.torch_runners import TorchRunners

    pipe = tiny_pipeline(TorchRunners(tiny), tiny)
    with pytest.raises(PipelineBusyError):
        latents_of(pipe, 1, callback=lambda *a: latents_of(pipe, 1))


def run_threads(jobs):
    results, errors = {}, []

    def run(key, job):
        try:
            results[key] = job()
        except Exception as err:  # noqa: BLE001 - the test reports every failure
            errors.append(err)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return results


def test_pipelines_sharing_torch_modules_run_concurrently_and_right(tiny):
    """Four pipelines over the same UNet (the SAG capture swaps its processor per call), different step counts."""
    from sagrt.runtime.torch_runners import TorchRunners

    pipes = {steps: tiny_pipeline(TorchRunners(tiny), tiny) for steps in (1, 2, 3, 4)}
    reference = {steps: latents_of(pipe, steps, seed=steps) for steps, pipe in pipes.items()}
    results = run_threads({steps: (lambda p=pipe, s=steps: latents_of(p, s, seed=s)) for steps, pipe in pipes.items()})
    for steps in pipes:
        assert torch.equal(results[steps], reference[steps]), steps


def test_pipelines_sharing_onnxruntime_runners_run_concurrently_and_right(tiny, tiny_onnx):
    from sagrt.engine.onnxruntime_runner import OrtRunners

    runners = OrtRunners(tiny_onnx, ["cpu"])
    pipes = {name: tiny_pipeline(runners, tiny, name) for name in ("dpm++2m", "euler-a", "ddim")}
    reference = {name: latents_of(pipe, 3) for name, pipe in pipes.items()}
    results = run_threads({name: (lambda p=pipe: latents_of(p, 3)) for name, pipe in pipes.items()})
    for name in pipes:
        assert torch.equal(results[name], reference[name]), name


# ---- 4, 5, 6. every bad argument of the API is one InputError line, before any work -----------------
NAN, INF = float("nan"), float("inf")
API_PROBES = {
    "prompt []": (dict(prompt=[]), "non-empty list of strings"),
    "prompt of ints": (dict(prompt=[1, 2]), "list holding int"),
    "prompt int": (dict(prompt=3), "prompt must be a string"),
    "guidance str": (dict(guidance_scale="7"), "guidance_scale must be a number, got str"),
    "guidance None": (dict(guidance_scale=None), "guidance_scale must be a number"),
    "guidance nan": (dict(guidance_scale=NAN), "guidance_scale must be a finite number"),
    "guidance -inf": (dict(guidance_scale=-INF), "guidance_scale must be a finite number"),
    "sag nan": (dict(sag_scale=NAN), "sag_scale must be a finite number"),
    "sag inf": (dict(sag_scale=INF), "sag_scale must be a finite number"),
    "eta nan": (dict(eta=NAN), "eta must be a finite number"),
    "images 0": (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1"),
    "images -1": (dict(num_images_per_prompt=-1), "num_images_per_prompt must be >= 1"),
    "images 1.5": (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer"),
    "embeds width": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 16)), r"shape \[batch, 77, 32\]"),
    "embeds length": (dict(prompt=None, prompt_embeds=torch.zeros(1, 10, 32)), r"shape \[batch, 77, 32\]"),
    "embeds rank": (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), r"shape \[batch, 77, 32\]"),
    "embeds numpy": (dict(prompt=None, prompt_embeds=[[0.0]]), "must be a torch.Tensor"),
    "latents numpy": (dict(latents=__import__("numpy").zeros((1, 4, 8, 8))), "latents must be a torch.Tensor"),
    "latents nan": (dict(latents=torch.full((1, 4, 8, 8), NAN)), "latents must be finite"),
    "generator int": (dict(generator=3), "generator must be a torch.Generator"),
    "generators too few": (dict(num_images_per_prompt=2, generator=[torch.Generator()]), "list of 1 generators"),
    "clip_skip big": (dict(clip_skip=3), "clip_skip must be <= 2"),
    "clip_skip -1": (dict(clip_skip=-1), "clip_skip must be >= 0"),
    "height 0": (dict(height=0), "height must be a positive multiple of 8, got 0"),
    "width 0": (dict(width=0), "width must be a positive multiple of 8"),
    "height str": (dict(height="64"), "height must be an integer, got str '64'"),
    "height bool": (dict(height=True), "height must be an integer"),
    "height huge": (dict(height=100000), r"100000x64 pixels x 1 image\(s\) needs at least .* GiB"),
    "attention huge": (dict(height=131072, width=64), "needs at least .* GiB for the SAG layer's attention maps"),
    "steps huge": (dict(num_inference_steps=1_000_000_000), "num_inference_steps must be <= 1000"),
    "steps float": (dict(num_inference_steps=2.0), "num_inference_steps must be an integer"),
    "kernel huge": (dict(sag=dict(blur_kernel=100001)), "blur kernel size 100001 is wider than a 8x8 latent"),
    "kernel float": (dict(sag=dict(blur_kernel=9.0)), "blur kernel size must be an integer"),
    "sigma inf": (dict(sag=dict(blur_sigma=INF)), "blur sigma must be a finite number"),
    "threshold nan": (dict(sag=dict(threshold=NAN)), "threshold must be a number"),
    "window nan": (dict(sag=dict(window=(NAN, 1.0))), "window must be a finite number"),
    "output_type": (dict(output_type="jpg"), "output_type must be"),
    "callback": (dict(callback=3), "callback must be callable"),
    "negative count": (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt has 1 entries"),
}


@pytest.fixture(scope="module")
def tiny_pipe(tiny):
    from sagrt.runtime.torch_runners import TorchRunners

    return tiny_pipeline(TorchRunners(tiny), tiny)


@pytest.mark.parametrize("probe", list(API_PROBES))
def test_bad_api_argument_is_one_input_error(tiny_pipe, probe):
    from sagrt.runtime import SAGConfig
    from sagrt.runtime.pipeline import InputError

    kwargs, message = API_PROBES[probe]
    kwargs = dict(prompt="a cat", height=64, width=64, num_inference_steps=1, output_type="latent") | kwargs
    with pytest.raises(InputError, match=message) as raised:
        if isinstance(kwargs.get("sag"), dict):
            kwargs["sag"] = SAGConfig(**kwargs["sag"])
        tiny_pipe(**kwargs)
    assert "\n" not in str(raised.value)


def test_threshold_infinity_stays_meaningful(tiny_pipe):
    from sagrt.runtime import SAGConfig

    assert latents_of(tiny_pipe, 1, sag=SAGConfig(threshold=INF)).isfinite().all()


def test_overflowing_guidance_stops_with_the_step_named(tiny_pipe):
    from sagrt.runtime.pipeline import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"step 1 of 2: the guidance .* produced NaN or Inf"):
        latents_of(tiny_pipe, 2, guidance_scale=1e300)  # finite, past float32


def test_a_unet_making_nan_stops_with_the_network_named(tiny):
    """A backend whose UNet breaks at the second step (as an fp16 overflow does): an error, never a black image."""
    from sagrt.runtime.pipeline import NonFiniteError
    from sagrt.runners import RunnersProxy
    from sagrt.runtime.torch_runners import TorchRunners

    class BreaksAtSecondStep(RunnersProxy):
        calls = 0

        def unet(self, sample, timestep, context, cross_attention_kwargs=None):
            eps, score = super().unet(sample, timestep, context, cross_attention_kwargs)
            self.calls += 1
            return (eps * NAN if self.calls == 3 else eps), score  # call 3: the cond/uncond pass of step 2

    pipe = tiny_pipeline(BreaksAtSecondStep(TorchRunners(tiny)), tiny)
    with pytest.raises(NonFiniteError, match=r"step 2 of 3: the UNet's noise prediction produced NaN"):
        latents_of(pipe, 3)


# ---- 6. the CLI: every bad input one line, exit status 2 -------------------------------------------
CLI_PROBES = {
    "seed past 2**64": (["generate", "--model", "tiny", "--seed", "18446744073709551616"], "seed must be an integer from"),
    "device bogus": (["generate", "--model", "tiny", "--device", "bogus"], "unknown device 'bogus'"),
    "device cuda": (["generate", "--model", "tiny", "--device", "cuda"], "CUDA, which is not available"),
    "opset 0": (["export", "--opset", "0"], "opset 0 is outside"),
    "opset 99": (["export", "--opset", "99"], "opset 99 is outside"),
    "guidance inf": (["generate", "--model", "tiny", "--guidance-scale", "inf"], "guidance_scale must be a finite number"),
    "guidance nan": (["generate", "--model", "tiny", "--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    "sag -inf": (["generate", "--model", "tiny", "--sag-scale=-inf"], "sag_scale must be a finite number"),
    "blur kernel huge": (["generate", "--model", "tiny", "--sag-blur-kernel", "100001"], "blur kernel size 100001 is wider"),
    "blur sigma nan": (["generate", "--model", "tiny", "--sag-blur-sigma", "nan"], "blur sigma must be a finite number"),
    "steps huge": (["generate", "--model", "tiny", "--steps", "1000000000", "--scheduler", "euler"], "must be <= 1000"),
    "height huge": (["generate", "--model", "tiny", "--height", "100000"], "needs at least"),
    "height 0": (["generate", "--model", "tiny", "--height", "0"], "height must be a positive multiple of 8"),
    "unwritable out": (["generate", "--model", "tiny", "--out", "/sys/sagrt-probe"], "cannot write to /sys/sagrt-probe"),
    "export unwritable": (["export", "--out", "/sys/sagrt-probe"], "cannot make export folder"),
    "bench seed": (["bench", "--size", "64x64", "--seed", "18446744073709551616"], "seed must be an integer"),
    "bench guidance nan": (["bench", "--size", "64x64", "--guidance-scale", "nan"], "guidance_scale must be a finite"),
    "compare sag inf": (["compare", "--model", "tiny", "a cat", "--out", "grid.png", "--steps", "1", "--sag-scales", "inf,1"],
                        "sag_scale must be a finite number"),
    "compare seed": (["compare", "--model", "tiny", "a cat", "--out", "grid.png", "--steps", "1", "--seed", "-9223372036854775809"],
                     "seed must be an integer"),
    "parity guidance inf": (["parity", "--steps", "1", "--guidance-scale", "inf"], "guidance_scale must be a finite"),
    "verify not a folder": (["verify", "secret.txt"], "is not a folder"),
}


@pytest.mark.parametrize("probe", list(CLI_PROBES))
def test_bad_cli_input_is_one_line(workspace, capsys, probe):
    argv, message = CLI_PROBES[probe]
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    before = tree_state(workspace)
    if argv[0] in ("generate", "compare"):  # the torch backend: auto would first export tiny into this fresh cache
        argv = [*argv, "--backend", "torch"] + ([] if "--steps" in argv else ["--steps", "1"])
    assert main(argv) == 2
    assert message in one_line_error(capsys, argv[0])
    assert tree_state(workspace) == before  # no sagrt-out/ left behind, nothing else touched


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path):
    """Writes past a file-size limit fail as on a full disk (EFBIG instead of ENOSPC)."""
    code = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
            "from sagrt.runtime.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    target = tmp_path / "new" / "export"
    done = subprocess.run([sys.executable, "-c", code, "export", "--out", str(target)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"sagrt export: error: cannot write the export in {target}: File too large"], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny model as a diffusers folder."""
    import warnings

    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny-folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
                                scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(folder)
    return folder


def broken_weights(folder):
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")


def foreign_scheduler(folder):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [(broken_weights, "cannot load model folder"),
                                             (foreign_scheduler, "'UNet2DConditionModel', which is not a diffusers "
                                                                 "scheduler")])
def test_damaged_model_folder_is_one_line(tiny_folder, workspace, capsys, damage, message):
    folder = workspace / "model"
    shutil.copytree(tiny_folder, folder)
    damage(folder)
    before = tree_state(workspace)
    assert main(["generate", "--model", "tiny", "--model", str(folder), "--steps", "1"]) == 2
    assert message in one_line_error(capsys, "generate")
    assert tree_state(workspace) == before


def test_graph_reading_weights_outside_is_one_line_in_the_cli(tiny, tmp_path, capsys):
    import onnx

    folder = export_model(tiny, tmp_path / "export", progress=False)
    graph = onnx.load(str(folder / "unet_fused.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "/etc/hostname"
    onnx.save(graph, str(folder / "unet_fused.onnx"))
    manifest = artifacts.read_manifest(folder)
    manifest["files"]["unet_fused.onnx"] = {"sha256": artifacts.sha256_file(folder / "unet_fused.onnx"),
                                            "bytes": (folder / "unet_fused.onnx").stat().st_size}
    artifacts.write_manifest(folder, manifest)
    for full in ("full", "fast"):  # once per boot the graphs are read; after that ONNX Runtime's refusal is one line
        assert main(["generate", "--model", "tiny", "--backend", "onnxruntime", "--export-dir", str(folder), "--steps", "1",
                     "--out", str(tmp_path / "images")]) == 2
        assert "unet_fused.onnx" in one_line_error(capsys, "generate")
        verify_export(folder, full=False)  # records a full verification as done, so the second round is fast
        record = json.loads((folder / artifacts.HASH_RECORD).read_text())
        record["verified_boot"] = artifacts.boot_id()
        (folder / artifacts.HASH_RECORD).write_text(json.dumps(record))


# ---- 9. smaller ones ---------------------------------------------------------------------------------
def test_summary_counts_steps_not_unet_iterations(workspace, capsys):
    assert main(["generate", "--model", "tiny", "--steps", "2", "--scheduler", "heun", "--sag-scale", "0"]) == 0
    assert ", 2 steps (3 UNet iterations), 64x64" in capsys.readouterr().out


def test_long_prompt_is_warned_about(workspace, caplog):
    assert main(["generate", "--model", "tiny", " ".join(["cat"] * 100), "--steps", "1"]) == 0
    assert "a prompt is 102 tokens, the text encoder takes 77: this part is ignored: 'cat cat" in caplog.text


def test_existing_images_are_never_overwritten(workspace, capsys):
    assert main(["generate", "--model", "tiny", "--steps", "1"]) == 0
    first = (workspace / "sagrt-out" / "sagrt-0-0.png").read_bytes()
    capsys.readouterr()
    assert main(["generate", "--model", "tiny", "--steps", "1", "--guidance-scale", "3"]) == 0
    assert "sagrt-0-0-2.png: numbered past existing files" in capsys.readouterr().out
    assert (workspace / "sagrt-out" / "sagrt-0-0.png").read_bytes() == first
    assert (workspace / "sagrt-out" / "sagrt-0-0-2.png").read_bytes() != first


# ---- 8. silent corruption: full verification -------------------------------------------------------
def flip_in_place(path: Path) -> None:
    """Changes one byte without changing the file's size, inode or mtime (bit rot, or a careful forger)."""
    info = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(info.st_size // 2)
        byte = fh.read(1)
        fh.seek(info.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_verify_reads_every_byte(tiny_onnx, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    assert main(["verify", str(folder)]) == 0
    assert "every sha256 matches the manifest" in capsys.readouterr().out
    flip_in_place(folder / "unet.onnx.data")
    verify_export(folder)  # the stat record of this boot still vouches for it: the fast path misses it
    assert main(["verify", str(folder)]) == 2
    err = one_line_error(capsys, "verify")
    assert "unet.onnx.data" in err and "is corrupted" in err


def test_a_new_boot_verifies_in_full(tiny_onnx, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_onnx, folder)
    verify_export(folder)
    flip_in_place(folder / "vae_decoder.onnx")
    record = json.loads((folder / artifacts.HASH_RECORD).read_text())
    assert record["verified_boot"] == artifacts.boot_id()
    record["verified_boot"] = "an-earlier-boot"
    (folder / artifacts.HASH_RECORD).write_text(json.dumps(record))
    with pytest.raises(ExportError, match="vae_decoder.onnx .* is corrupted"):
        verify_export(folder)


def test_verify_engine_folder_and_refusals(tmp_path, capsys):
    """An engine folder is checked the same way (its engines are hashed; no TensorRT needed to read them)."""
    folder = tmp_path / "engines"
    folder.mkdir()
    (folder / "unet.plan").write_bytes(b"engine bytes" * 100)
    entry = {"file": "unet.plan", "sha256": artifacts.sha256_file(folder / "unet.plan"), "bytes": 1200}
    artifacts.write_manifest(folder, {"kind": "tensorrt", "engines": {"unet": entry}})
    assert main(["verify", str(folder)]) == 0
    assert "TensorRT engines, 1 file(s)" in capsys.readouterr().out
    flip_in_place(folder / "unet.plan")
    assert main(["verify", str(folder)]) == 2
    assert "unet.plan" in one_line_error(capsys, "verify")
    artifacts.write_manifest(folder, {"kind": "tensorrt", "engines": {"unet": {**entry, "file": "../x.plan"}}})
    assert main(["verify", str(folder)]) == 2
    assert "not a plain relative file name" in one_line_error(capsys, "verify")
    assert main(["verify", str(tmp_path)]) == 2
    assert "holds no sagrt manifest" in one_line_error(capsys, "verify")


def test_old_unlocked_staging_is_removed_only_in_sagrts_folder(tiny_onnx, tmp_path):
    old = time.time() - 2 * artifacts.LEGACY_STAGING_AGE_S
    for name in ("export", "foreign"):
        (tmp_path / name / ".export-old").mkdir(parents=True)
        os.utime(tmp_path / name / ".export-old", (old, old))
    shutil.copytree(tiny_onnx, tmp_path / "export", dirs_exist_ok=True)
    from sagrt.export.onnx_export import claim_folder

    claim_folder(tmp_path / "export")
    claim_folder(tmp_path / "foreign")  # holds nothing but the staging-like folder: usable, and it is kept
    assert not (tmp_path / "export" / ".export-old").exists()
    assert (tmp_path / "foreign" / ".export-old").is_dir()


def test_capped_torch_threads_is_per_thread_and_restores():
    from sagrt.runners import capped_torch_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside, leave = threading.Event(), threading.Event()
        seen = []

        def capped():
            torch.set_num_threads(2)
            with capped_torch_threads(1):
                seen.append(torch.get_num_threads())
                inside.set()
                leave.wait(timeout=10)
            seen.append(torch.get_num_threads())

        other = threading.Thread(target=capped)
        other.start()
        assert inside.wait(timeout=10)
        assert torch.get_num_threads() == 2  # this thread is not capped by the other's block
        leave.set()
        other.join(timeout=10)
        assert seen == [1, 2]
        with capped_torch_threads(None):
            assert torch.get_num_threads() == 2
        with capped_torch_threads(4):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
