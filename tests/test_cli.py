"""`sagrt generate` end to end on the tiny model, and its one-line errors (exit status 2)."""

import shutil
import subprocess

import pytest
from PIL import Image

from sagrt.runtime.cli import main


def test_console_script_help():
    exe = shutil.which("sagrt")
    assert exe, "the sagrt console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out


def test_generate_writes_one_png_named_by_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny", "--steps", "3"]) == 0
    files = sorted((tmp_path / "sagrt-out").glob("*.png"))
    assert [f.name for f in files] == ["sagrt-0-0.png"]
    assert Image.open(files[0]).size == (64, 64)
    out = capsys.readouterr().out
    assert "model load" in out and "step median" in out and "total" in out


def test_generate_options(tmp_path, capsys):
    out_dir = tmp_path / "imgs"
    code = main(["generate", "--model", "tiny", "a cat", "--steps", "2", "--guidance-scale", "5", "--sag-scale", "1.0",
                 "--negative-prompt", "blurry", "--height", "72", "--width", "96", "--scheduler", "dpm++2m",
                 "--seed", "3", "--num-images", "2", "--out", str(out_dir)])
    assert code == 0
    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files] == ["sagrt-3-0.png", "sagrt-3-1.png"]
    assert Image.open(files[1]).size == (96, 72)
    assert "DPMSolverMultistepScheduler" in capsys.readouterr().out
    assert not list(out_dir.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("args, message", [
    (["--height", "60"], "multiple of 8"),
    (["--width", "8"], "minimum"),
    (["--steps", "0"], ">= 1"),
    (["--steps", "1000"], "reaches timestep 1000, past the model's 1000 training timesteps: use fewer steps"),
    (["--scheduler", "nope"], "unknown scheduler"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--num-images", "0"], "--num-images"),
])
def test_generate_bad_input(tmp_path, capsys, args, message):
    out_dir = tmp_path / "never"
    assert main(["generate", "--model", "tiny", "--steps", "2", "--out", str(out_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sagrt generate: error:") and message in err[0]
    assert not out_dir.exists()  # nothing half-written left behind


def test_generate_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny", "--backend", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_generate_missing_component_and_unwritable_out(tmp_path, capsys):
    folder = tmp_path / "model"
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True)
    assert main(["generate", "--model", "tiny", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "lacks vae/" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "--model", "tiny", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_ctrl_c_exits_130_in_one_line_and_writes_no_image(tmp_path):
    """SIGINT (Ctrl-C) in the middle of the denoising loop: exit status 130, one 'interrupted' line, no image."""
    import signal
    import time

    from conftest import CliProcess

    run = CliProcess("generate", "--model", "tiny", "a cat", "--steps", "500", "--out", str(tmp_path / "out"))
    run.wait_for("denoise:")  # the loop's progress bar: the model is loaded and steps are starting
    time.sleep(1.0)  # well inside the loop
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.stderr
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.startswith("sagrt")]
    assert lines == ["sagrt generate: interrupted"], run.stderr
    assert "Traceback" not in run.stderr
    assert not list(tmp_path.rglob("*.png"))
