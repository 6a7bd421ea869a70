"""`sagrt` command line. Each subcommand is a module with `add_arguments(parser)` and `run(args)`.

Errors a user can fix (SagrtError, bad paths) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sagrt.errors import SagrtError
from sagrt.runtime.interrupts import terminate_as_interrupt

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("sagrt.runtime.commands.generate", "generate images with SAG"),
    "export": ("sagrt.runtime.commands.export", "export a model to ONNX with the SAG attention output"),
    "parity": ("sagrt.runtime.commands.parity", "compare two backends step by step against the numerical contract (docs/design.md)"),
    "build": ("sagrt.runtime.commands.build", "export if needed, then build TensorRT engines for this GPU"),
    "compare": ("sagrt.runtime.commands.compare", "one grid PNG: schedulers x SAG scales, optionally with the SAG mask"),
    "bench": ("sagrt.bench.command", "time sagrt backends against eager diffusers, with parity"),
    "verify": ("sagrt.runtime.commands.verify", "read every file of an export or engine folder against its manifest"),
    "serve": ("sagrt.serve.command", "HTTP service: native, OpenAI and A1111 endpoints, batching, Ray"),
}


def build_parser() -> argparse.ArgumentParser:
    from sagrt import __version__

    parser = argparse.ArgumentParser(prog="sagrt", description="Stable Diffusion with Self-Attention Guidance "
                                     "on compiled engines (TensorRT, ONNX Runtime), with PyTorch parity.")
    parser.add_argument("--version", action="version", version=f"sagrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from sagrt.engine.packages import onnxruntime_conflict  # two ONNX Runtimes break the GPU providers

    conflict = onnxruntime_conflict()
    if conflict:
        print(f"sagrt: warning: {conflict}", file=sys.stderr)
    try:
        with terminate_as_interrupt():
            return importlib.import_module(args.module).run(args) or 0
    except (SagrtError, OSError) as err:  # OSError: a full disk, a read-only or missing folder...
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"sagrt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sagrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
