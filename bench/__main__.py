"""`python -m sagrt.bench CASE OUT`: the measuring subprocess of `sagrt bench` (see sagrt.bench.worker)."""

import sys

from sagrt.bench.worker import worker_main

sys.exit(worker_main(*sys.argv[1:3]))
