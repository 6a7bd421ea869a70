"""The same app on Ray Serve: one replica per GPU (or CPU replicas), each its own process with one engine
worker; Ray's HTTP proxy spreads requests, holds at most `max_ongoing_requests` per replica and answers 429
past `max_queued_requests`. `sagrt serve --ray` starts a local Ray instance or joins a cluster (--ray-address)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading

from sagrt.errors import SagrtError


class RayError(SagrtError):
    """Ray Serve is missing or a Ray option is out of range."""


class SagrtReplica:
    """A Ray Serve replica: a Service over its own pipeline; the FastAPI app is built inside the replica
    (`__serve_build_asgi_app__`), so no engine state crosses processes."""

    async def __init__(self, config):
        import asyncio

        from ray import serve

        from sagrt.serve.service import Service

        tag = serve.get_replica_context().replica_id.unique_id
        self.config = dataclasses.replace(config, replica=f"{socket.gethostname()}:{os.getpid()}:{tag}")
        self.service = Service(self.config)
        self.service.start()
        # the replica counts as started only once its model is loaded and warm
        await asyncio.get_running_loop().run_in_executor(None, self.service.worker.loaded.wait)
        if self.service.worker.load_error is not None:
            raise self.service.worker.load_error

    def __serve_build_asgi_app__(self):
        from sagrt.serve.app import create_app

        return create_app(self.config, self.service)

    async def check_health(self):
        """Ray's health check: the engine runs (one step at the default size when idle)."""
        await self.service.probe(timeout=60.0)


def build_app(config, replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
              autoscaling: dict | None = None):
    """The bound Ray Serve application of `config`."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    options = dict(
        name="sagrt",
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # one call running and one batch waiting per replica; the rest wait in Ray's queue, then 429
        max_ongoing_requests=2 * config.max_batch,
        max_queued_requests=config.max_queue,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        health_check_period_s=10, health_check_timeout_s=90,
        graceful_shutdown_timeout_s=config.drain_timeout,
    )
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(**options)(serve.ingress()(SagrtReplica))
    return deployment.bind(config)


def autoscaling_options(args, config) -> dict | None:
    if args.min_replicas is None and args.max_replicas is None:
        return None
    low = args.min_replicas if args.min_replicas is not None else 1
    high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas)
    if not 0 <= low <= high or high < 1:
        raise RayError(f"--min-replicas {low} and --max-replicas {high} must satisfy 0 <= min <= max, max >= 1")
    return {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(args.replicas, low), high),
            "target_ongoing_requests": args.target_ongoing_requests or config.max_batch}


def deploy(config, args) -> int:
    """Deploys on Ray Serve. With --ray-address the app stays on the cluster after this command returns
    (`serve shutdown` removes it); otherwise a local Ray instance runs until SIGTERM or Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RayError("sagrt serve --ray needs Ray Serve: pip install 'sagrt[ray]'") from None
    if args.replicas < 1:
        raise RayError(f"--replicas must be >= 1, got {args.replicas}")
    autoscaling = autoscaling_options(args, config)
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        cpus = max(2, int(args.replicas * args.num_cpus_per_replica + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(config, args.replicas, args.num_gpus_per_replica, args.num_cpus_per_replica, autoscaling)
    serve.run(app, name="sagrt", route_prefix="/")
    print(f"sagrt serve: {args.replicas} replica(s) of {config.model} on Ray Serve at http://{args.host}:{args.port}",
          flush=True)
    if args.ray_address:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
