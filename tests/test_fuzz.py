"""Fuzzing: hypothesis over the CLI's arguments and the API's keyword arguments (issue 11).

For every input: exit status 0 with valid images, or exit status 2 with exactly one error line on stderr and
no traceback (the API: images, or one SagrtError line); and no file outside the output or export folder is
created, changed or removed (a sentinel tree is hashed before and after every example). Examples are few,
tiny and derandomized, so the suite is fast and the same on every run.
"""

import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from sagrt.errors import SagrtError
from sagrt.runtime.cli import main
from test_hardening import make_sentinel, tree_state

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def is_progress(line: str) -> bool:
    """A tqdm progress line ("denoise: 100%|####| 1/1 [...]"), which shares stderr with errors."""
    return "%|" in line and "it/s" in line or "s/it" in line or "part/s" in line or "s/part" in line


def error_lines(stderr: str) -> list[str]:
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and not is_progress(line)]


# ---- the CLI -----------------------------------------------------------------------------------------
SIDES = st.one_of(st.sampled_from(["64", "72", "16", "48"]),
                  st.sampled_from(["0", "-64", "8", "60", "100000", "18446744073709551616", "6.4e1", "abc", ""]),
                  st.integers(-100, 130).map(str))
FLOATS = st.one_of(st.sampled_from(["0", "1", "7.5", "0.75", "-1", "2"]),
                   st.sampled_from(["nan", "inf", "-inf", "1e309", "1e300", "x", ""]),
                   st.floats(-20, 20, allow_nan=False).map(repr))
OPTIONS = {
    "--steps": st.one_of(st.sampled_from(["1", "2"]), st.sampled_from(["0", "-1", "1000000000", "1.5", "two"])),
    "--height": SIDES,
    "--width": SIDES,
    "--guidance-scale": FLOATS,
    "--sag-scale": FLOATS,
    "--seed": st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(["0", "-1", "x"])),
    "--scheduler": st.sampled_from(["ddim", "euler", "heun", "dpm++2m", "euler-a", "unipc", "pndm", "lms", "nope",
                                    "DDIMScheduler", ""]),
    "--num-images": st.sampled_from(["1", "2", "0", "-3", "x"]),
    "--sag-blur-kernel": st.sampled_from(["9", "3", "1", "0", "4", "-9", "100001", "x"]),
    "--sag-blur-sigma": FLOATS,
    "--sag-threshold": FLOATS,
    "--sag-window": st.sampled_from(["0:1", "0:0.5", "0.5:0.2", "nan:1", "0", "a:b", "0:1:2", "-1:2"]),
    "--negative-prompt": st.text(max_size=40),
    "--device": st.sampled_from(["cpu", "bogus", "cuda:7", "meta", "cpu:0"]),
    "--dtype": st.sampled_from(["fp32", "fp16", "int8"]),
    "--backend": st.sampled_from(["torch", "onnxruntime", "nope"]),
    "--export-dir": st.sampled_from(["../keep", "../secret.txt", "/sys/sagrt-probe", "../keep/tokenizer"]),
    "--sag-layer": st.sampled_from(["mid_block.attentions.0.transformer_blocks.0.attn1",
                                    "up_blocks.0.attentions.0.transformer_blocks.0.attn1", "mid_block", "x.attn1"]),
}
PROMPTS = st.one_of(st.text(max_size=60), st.sampled_from(["a cat", " ".join(["dog"] * 90), "-", "--steps"]))


@st.composite
def generate_argv(draw):
    chosen = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=6, unique=True))
    argv = ["generate", "--", draw(PROMPTS)] if draw(st.booleans()) else ["generate"]
    options = []
    for name in chosen:
        options += [f"{name}={draw(OPTIONS[name])}"]  # --x=VALUE: a value starting with '-' stays a value
    options.append("--model=tiny")  # the test model (generate's default is the trained shapes preset)
    if "--backend" not in chosen:
        options.append("--backend=torch")  # auto would export on first use: the fuzzing is about the arguments
    if "--steps" not in chosen:
        options.append("--steps=1")
    if "--height" not in chosen and "--width" not in chosen:
        options.append("--height=64")
    return options + argv if "--" in argv else argv + options


def check_cli(argv, work: Path, capsys) -> None:
    out_dir = work / "out"
    export_dir = work.parent / "export"
    before = tree_state(work.parent, skip=[out_dir, export_dir])
    argv = [*argv, f"--out={out_dir}"]
    if "--backend=onnxruntime" in argv and not any(arg.startswith("--export-dir=") for arg in argv):
        argv.append(f"--export-dir={export_dir}")
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    event(f"exit {code}")
    assert "Traceback" not in captured.err, (argv, captured.err)
    if code == 0:
        pngs = sorted(out_dir.glob("*.png"))
        assert pngs, argv
        for png in pngs:
            with Image.open(png) as image:
                image.verify()
        assert not error_lines(captured.err) or all("token" in line or "Warning" in line
                                                    for line in error_lines(captured.err)), captured.err
    else:
        assert code == 2, (argv, code, captured.err)
        lines = error_lines(captured.err)
        assert len(lines) == 1 and lines[0].startswith("sagrt"), (argv, captured.err)
        assert " error: " in lines[0], lines
    assert tree_state(work.parent, skip=[out_dir, export_dir]) == before, argv
    shutil.rmtree(out_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def fuzz_root(tiny_onnx, tmp_path_factory):
    """A sentinel tree, a copy of the tiny export for the onnxruntime backend, and the cache inside."""
    root = make_sentinel(tmp_path_factory.mktemp("fuzz"))
    shutil.copytree(tiny_onnx, root / "export")
    (root / "work").mkdir()
    return root


@FUZZ
@given(argv=generate_argv())
def test_fuzz_generate(fuzz_root, capsys, monkeypatch, argv):
    monkeypatch.chdir(fuzz_root / "work")
    monkeypatch.setenv("SAGRT_CACHE", str(fuzz_root / "cache"))
    check_cli(argv, fuzz_root / "work", capsys)


COMPARE_OPTIONS = {
    "--schedulers": st.sampled_from(["ddim", "ddim,euler", "nope", "", "ddim,,", "heun,dpm++2m"]),
    "--sag-scales": st.sampled_from(["0,1", "0.75", "x", "nan", "inf", "-1", "", "0,0,0"]),
    "--show-mask": st.sampled_from(["0", "1", "-1", "5", "x"]),
    "--seed": st.sampled_from(["0", "18446744073709551616", "-1"]),
    "--guidance-scale": FLOATS,
    "--height": SIDES,
}


@settings(FUZZ, max_examples=25)
@given(options=st.fixed_dictionaries({}, optional=COMPARE_OPTIONS),
       out=st.sampled_from(["grid.png", "grid.jpg", "../secret.txt", "sub/grid.png", "/sys/grid.png"]))
def test_fuzz_compare(fuzz_root, capsys, monkeypatch, options, out):
    monkeypatch.chdir(fuzz_root / "work")
    monkeypatch.setenv("SAGRT_CACHE", str(fuzz_root / "cache"))
    before = tree_state(fuzz_root, skip=[fuzz_root / "work"])
    argv = ["compare", "a cat", "--model=tiny", "--backend=torch", "--steps=1", f"--out={out}",
            *(f"{k}={v}" for k, v in options.items())]
    if "--height" not in options:
        argv.append("--height=64")
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert "Traceback" not in err, (argv, err)
    if code == 0:
        with Image.open(fuzz_root / "work" / out) as grid:
            grid.verify()
    else:
        assert code == 2 and len(error_lines(err)) == 1, (argv, err)
    assert tree_state(fuzz_root, skip=[fuzz_root / "work"]) == before, argv
    for child in (fuzz_root / "work").iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


EXPORT_OPTIONS = {
    "--opset": st.one_of(st.integers(-5, 40).filter(lambda n: not 14 <= n <= 20).map(str), st.just("x")),
    "--precision": st.sampled_from(["fp32", "fp16", "bf16"]),
    "--model": st.sampled_from(["tiny", "nope", "/no/such/folder", "../work", "sd15/"]),
    "--sag-layer": st.sampled_from(["mid_block", "down_blocks.9.attentions.0.transformer_blocks.0.attn1"]),
}


@settings(FUZZ, max_examples=15)
@given(options=st.fixed_dictionaries({}, optional=EXPORT_OPTIONS),
       out=st.sampled_from(["new", "../secret.txt", "../keep", "/sys/sagrt-probe", "new/deeper", "."]))
def test_fuzz_export_refusals(fuzz_root, capsys, monkeypatch, options, out):
    """Export arguments that must be refused before any export work (valid opsets are left out: an export takes
    seconds, and the probes in test_hardening cover them)."""
    monkeypatch.chdir(fuzz_root / "work")
    monkeypatch.setenv("SAGRT_CACHE", str(fuzz_root / "cache"))
    if not options:
        options = {"--opset": "0"}
    if options.get("--opset") is None and options.get("--model", "tiny") == "tiny" and "--sag-layer" not in options:
        options["--opset"] = "3"  # keep every example a refusal
    before = tree_state(fuzz_root, skip=[fuzz_root / "work" / "new"])
    argv = ["export", f"--out={out}", *(f"{k}={v}" for k, v in options.items())]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, (argv, err)
    assert tree_state(fuzz_root, skip=[fuzz_root / "work" / "new"]) == before, argv
    assert not (fuzz_root / "work" / "new").exists(), argv


# ---- the API -----------------------------------------------------------------------------------------
ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5))
API_KWARGS = {
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                        st.lists(st.integers(), max_size=2), st.none(), st.integers()),
    "negative_prompt": st.one_of(st.none(), st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3)),
    "height": st.one_of(st.sampled_from([None, 64, 72, 16, 0, -64, 60, 100000, 2**40]), ANY),
    "width": st.one_of(st.sampled_from([None, 64, 48, 8]), ANY),
    "num_inference_steps": st.one_of(st.sampled_from([1, 2, 0, -1, 10**9, 1.0]), ANY),
    "guidance_scale": st.one_of(st.sampled_from([0.0, 1.0, 7.5, math.inf, -math.inf, math.nan, 1e300, "7"]), ANY),
    "sag_scale": st.one_of(st.sampled_from([0.0, 0.75, 2.0, math.nan, math.inf, 1e300]), ANY),
    "num_images_per_prompt": st.one_of(st.sampled_from([1, 2, 0, -1, 1.5]), ANY),
    "eta": st.one_of(st.sampled_from([0.0, 1.0, math.nan]), ANY),
    "clip_skip": st.one_of(st.sampled_from([None, 0, 1, 2, 3, -1]), ANY),
    "output_type": st.sampled_from(["latent", "np", "pt", "pil", "jpg", None]),
    "generator": st.sampled_from(["one", "list1", "list2", "int", None]),
    "prompt_embeds": st.sampled_from([None, (1, 77, 32), (2, 77, 32), (1, 77, 16), (1, 10, 32), (77, 32), "numpy"]),
    "latents": st.sampled_from([None, (1, 4, 8, 8), (1, 4, 9, 8), "nan", "numpy"]),
    "callback_steps": st.one_of(st.sampled_from([1, 2, 0, -1]), ANY),
    "sag": st.sampled_from([None, {"blur_kernel": 3}, {"blur_kernel": 100001}, {"blur_kernel": 4},
                            {"threshold": math.inf}, {"threshold": math.nan}, {"blur_sigma": 0.0},
                            {"window": (0.0, 0.5)}, {"window": (math.nan, 1.0)}, "config"]),
}


def materialize(kwargs: dict) -> dict:
    """Turns the drawn placeholders into the objects the API takes (generators, tensors, configs)."""
    import numpy as np

    from sagrt.runtime import SAGConfig

    kwargs = dict(kwargs)
    kwargs["generator"] = {"one": torch.Generator().manual_seed(1), "list1": [torch.Generator()],
                           "list2": [torch.Generator(), torch.Generator()], "int": 3,
                           None: None}[kwargs.get("generator")]
    for name, fill in (("prompt_embeds", torch.randn), ("latents", torch.randn)):
        value = kwargs.get(name)
        if value == "numpy":
            kwargs[name] = np.zeros((1, 77, 32))
        elif value == "nan":
            kwargs[name] = torch.full((1, 4, 8, 8), math.nan)
        elif isinstance(value, tuple):
            kwargs[name] = fill(*value)
    if isinstance(kwargs.get("sag"), dict):
        kwargs["sag"] = SAGConfig(**kwargs["sag"])
    return kwargs


@pytest.fixture(scope="module")
def api_pipe(tiny):
    from sagrt.runtime import SAGPipeline
    from sagrt.runners import ModelInfo
    from sagrt.runtime.torch_runners import TorchRunners

    pipe = SAGPipeline(TorchRunners(tiny), tiny.tokenizer, tiny.scheduler, ModelInfo.of(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@settings(FUZZ, max_examples=200)
@given(drawn=st.fixed_dictionaries({}, optional=API_KWARGS))
def test_fuzz_api(api_pipe, drawn):
    try:
        kwargs = materialize(drawn)
    except SagrtError as err:  # SAGConfig refuses its own arguments, also one line
        assert "\n" not in str(err)
        return
    kwargs.setdefault("height", 64)
    kwargs.setdefault("num_inference_steps", 1)
    if "prompt" not in kwargs and kwargs.get("prompt_embeds") is None:
        kwargs["prompt"] = "a cat"
    try:
        output = api_pipe(**kwargs)
    except SagrtError as err:
        event("refused")
        assert str(err) and "\n" not in str(err), str(err)
        return
    event("images")
    images = output.images
    count = len(images) if not isinstance(images, torch.Tensor) else images.shape[0]
    assert count >= 1
    if kwargs.get("output_type") == "pil" or kwargs.get("output_type") is None:
        assert all(isinstance(image, Image.Image) for image in images)
    if isinstance(images, torch.Tensor):
        assert bool(torch.isfinite(images).all())


def test_error_lines_ignores_progress_bars():
    err = "\rdenoise:   0%|          | 0/1 [00:00<?, ?it/s]\rdenoise: 100%|#| 1/1 [00:00<00:00, 9.1it/s]\n" \
          "sagrt generate: error: bad\n"
    assert error_lines(err) == ["sagrt generate: error: bad"]
    assert error_lines("Traceback (most recent call last):\n  File x\nValueError: y\n") == [
        "Traceback (most recent call last):", "File x", "ValueError: y"]
