"""sagrt serve: an HTTP service over one pipeline (native, OpenAI Images, AUTOMATIC1111), or Ray Serve replicas."""

from __future__ import annotations

import importlib.util

from sagrt.errors import SagrtError
from sagrt.runtime.commands.common import PICTURE_MODEL, add_model_arguments, backend_options
from sagrt.runtime.schedulers import canonical_name
from sagrt.serve.config import ServeConfig, parse_size


def add_arguments(parser):
    add_model_arguments(parser, default_model=PICTURE_MODEL)
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help="default scheduler of requests that name none (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=4, help="images merged into one pipeline call (default: 4)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for the engine before new ones get 429 (default: 64)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a request may take from arrival, else 504 and its work stops (default: 300)")
    parser.add_argument("--max-size", default="1024x1024", metavar="WxH",
                        help="largest image a request may ask for (default: 1024x1024)")
    parser.add_argument("--max-steps", type=int, default=150, help="most denoising steps per request (default: 150)")
    parser.add_argument("--max-images", type=int, default=8, help="most images per request (default: 8)")
    parser.add_argument("--max-body-kb", type=int, default=256, help="largest request body, else 413 (default: 256)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests before exiting (default: 30)")
    parser.add_argument("--no-warmup", action="store_true", help="report ready without the warm-up run")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = parser.add_argument_group("Ray Serve (scale-out)")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of one uvicorn process")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="join a running Ray cluster (e.g. auto or ray://head:10001; default: start a local one)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (default: 1; with autoscaling: the start)")
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default: 0, CPU)")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default: 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests per replica to aim for (default: --max-batch)")


def config_from_args(args):
    return ServeConfig(
        model=args.model, backend=args.backend, safety_checker=not args.no_safety_checker, sag_layer=args.sag_layer,
        backend_options=tuple(sorted(backend_options(args).items())), scheduler=args.scheduler,
        max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout, max_size=parse_size(args.max_size),
        max_steps=args.max_steps, max_images=args.max_images, max_body_bytes=args.max_body_kb * 1024,
        drain_timeout=args.drain_timeout, warmup=not args.no_warmup)


def run(args) -> int:
    missing = [name for name in ("fastapi", "uvicorn", "pydantic", "prometheus_client")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise SagrtError(f"sagrt serve needs {', '.join(missing)}: pip install 'sagrt[serve]'")
    config = config_from_args(args)
    if args.scheduler is not None:
        canonical_name(args.scheduler)  # refuse an unknown name before loading anything
    if args.ray:
        from sagrt.serve.ray_app import deploy

        return deploy(config, args)
    from sagrt.serve.server import serve

    return serve(config, host=args.host, port=args.port, log_level=args.log_level)
