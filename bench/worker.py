"""The measuring subprocess and its driver: `python -m sagrt.bench CASE OUT` loads and warms up one case,
then makes one timed run per word of its parent, so that the baseline and every backend take turns run by run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

from sagrt.bench.config import BenchError
from sagrt.bench.measure import Measurement, load
from sagrt.bench.timing import CallLog
from sagrt.errors import SagrtError

READY = "sagrt-bench: ready"
# between two workers' runs, so that the process that just ran has wound down (its threads stop spinning) before
# the next one's timed run (docs/NOTES.md: runs right after another process's were slower)
TURN_PAUSE_S = 0.2


def worker_main(case_path: str, out_path: str) -> int:
    """Entry point of the measuring subprocess: loads and warms up the case, prints READY, then makes one timed
    run per line it reads ("sag" or "cfg", answering READY after each) until "finish"; writes the results (or one
    error line)."""
    case = json.loads(Path(case_path).read_text())
    torch.set_grad_enabled(False)
    try:
        if case.get("load_only"):
            load(case, CallLog())
            payload = {}
        else:
            measurement = Measurement(case, progress=lambda line: print(line, file=sys.stderr, flush=True))
            print(READY, flush=True)
            for command in sys.stdin:
                if command.strip() == "finish":
                    break
                measurement.run(command.strip() == "sag")
                print(READY, flush=True)
            payload = measurement.finish()
    except (SagrtError, FileNotFoundError) as err:
        torch.save({"error": str(err).splitlines()[0] if str(err) else type(err).__name__}, out_path)
        return 2
    torch.save(payload, out_path)
    return 0


# ---- the parent: one worker per (backend, size), taking turns; ratios against the baseline --------

class Worker:
    """One case measured in a fresh Python process, driven run by run; its progress lines go to our stderr."""

    def __init__(self, case: dict, folder: Path):
        stem = f"{case['backend'].replace(':', '-')}-{case['height']}x{case['width']}" + ("-load" if case.get("load_only") else "")
        self.case, case_path, self.out_path = case, folder / f"{stem}.json", folder / f"{stem}.pt"
        case_path.write_text(json.dumps(case))
        self.process = subprocess.Popen([sys.executable, "-m", "sagrt.bench", str(case_path),
                                         str(self.out_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not case.get("load_only"):
            self._wait_ready()

    def _wait_ready(self) -> None:
        for line in self.process.stdout:
            if line.strip() == READY:
                return
            sys.stderr.write(line)  # whatever a library printed
        self.finish()  # the worker ended instead: its error

    def run(self, sag: bool) -> None:
        try:
            self.process.stdin.write("sag\n" if sag else "cfg\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.finish()
        self._wait_ready()

    def finish(self) -> dict:
        """Ends the worker; its payload, or a BenchError with its error line."""
        try:
            self.process.stdin.write("finish\n")
            self.process.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        sys.stderr.write(self.process.stdout.read())
        code = self.process.wait()
        payload = torch.load(self.out_path, weights_only=False) if self.out_path.exists() else {}
        if code != 0 or "error" in payload:
            case = self.case
            # a worker ended by a signal (the OOM killer's SIGKILL) printed no traceback
            how = (f"killed by {signal.Signals(-code).name}" if code < 0
                   else f"exit status {code}; its traceback is above")
            raise BenchError(payload.get("error") or f"measuring {case['backend']} at {case['height']}x"
                             f"{case['width']} failed (worker {how})")
        return payload

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

