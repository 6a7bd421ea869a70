"""One service process: the engine worker plus its state (loading, ready, draining), seen by every endpoint.

HTTP handlers only validate, submit and await: `Service.submit` queues a job (or refuses it at once), and
`Service.wait` awaits its result while watching the client and the deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from sagrt.errors import SagrtError
from sagrt.runtime.schedulers import canonical_name, scheduler_names
from sagrt.serve.engine import Engine
from sagrt.serve.metrics import Metrics
from sagrt.serve.schemas import FieldError, GenerationParams, check_limits
from sagrt.serve.worker import Job, JobError, JobResult, QueueFull, Worker

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


class Unavailable(JobError):
    """503: the engine is loading, draining or failed to load."""

    def __init__(self, message: str, retry_after: int | None = 5):
        super().__init__(503, message)
        self.retry_after = retry_after


class Service:
    def __init__(self, config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.engine = Engine(config, self.metrics)
        self.worker = Worker(self.engine, config, self.metrics)
        self.draining = False
        self.started = time.time()
        self.waiting = 0  # generation requests between acceptance and answer

    # ---- life cycle ---------------------------------------------------------------------------------
    def start(self):
        """Starts the engine thread (it loads and warms the model); a second call does nothing."""
        if not self.worker.thread.is_alive() and not self.worker.loaded.is_set():
            self.worker.start()

    async def probe(self, timeout: float = 60.0):
        """Raises unless the engine works: loaded, its thread alive, and either busy making progress or able to
        run one denoising step at the default size now (for orchestrators' health checks)."""
        if self.worker.load_error is not None or (self.worker.loaded.is_set() and not self.worker.thread.is_alive()):
            raise RuntimeError(f"sagrt engine is down: {self.worker.load_error or 'its thread exited'}")
        if self.state != READY:
            return  # loading or draining: alive, readiness says the rest
        if self.worker.busy:
            if time.monotonic() - self.worker.last_progress > timeout:
                raise RuntimeError(f"sagrt engine made no progress for {timeout:.0f} s")
            return
        size = self.engine.limits.default_size  # the warm-up size, known to work
        job = self.submit(GenerationParams(prompt="health check", width=size, height=size, steps=1, seed=0,
                                           scheduler=self.default_scheduler()), f"health-{uuid.uuid4().hex[:8]}")
        await asyncio.wait_for(asyncio.shield(job.future), timeout)

    def stop(self):
        self.worker.stop()

    def drain(self):
        """Readiness goes 503 and new work is refused; queued and running requests still finish."""
        self.draining = True
        self.metrics.ready.set(0)

    @property
    def idle(self) -> bool:
        return self.waiting == 0 and not self.worker.busy

    @property
    def state(self) -> str:
        if self.worker.load_error is not None:
            return FAILED
        if not self.worker.loaded.is_set() or self.engine.pipe is None:
            return LOADING
        return DRAINING if self.draining else READY

    def check_ready(self):
        state = self.state
        if state == READY:
            return
        if state == FAILED:
            err = self.worker.load_error
            raise Unavailable(f"the model failed to load: {str(err).splitlines()[0] if str(err) else err!r}", None)
        self.metrics.rejections.labels(state).inc()
        raise Unavailable(f"the service is {state}: retry shortly" if state == LOADING
                          else "the service is draining for shutdown: send the request to another replica")

    # ---- requests -----------------------------------------------------------------------------------
    def validate(self, params: GenerationParams, fields: dict[str, str] | None = None) -> GenerationParams:
        """Model and service bounds; FieldError names the request's field. Needs a loaded engine."""
        self.check_ready()
        try:
            params = check_limits(params, self.engine.limits, self.config, fields or {})
            self.engine.scheduler_for(params.scheduler, params.karras_sigmas)
        except FieldError:
            self.metrics.rejections.labels("invalid").inc()
            raise
        except SagrtError as err:  # e.g. Karras sigmas on a scheduler without them
            self.metrics.rejections.labels("invalid").inc()
            field = (fields or {}).get("karras_sigmas", "karras_sigmas") if params.karras_sigmas else \
                (fields or {}).get("scheduler", "scheduler")
            raise FieldError(field, str(err).splitlines()[0]) from None
        return params

    def submit(self, params: GenerationParams, request_id: str | None = None, stream: bool = False) -> Job:
        """A queued job, or QueueFull (429) at once."""
        self.check_ready()
        loop = asyncio.get_running_loop()
        job = Job(params=params, id=request_id or uuid.uuid4().hex, loop=loop,
                  deadline=time.monotonic() + self.config.timeout, events=asyncio.Queue() if stream else None)
        if job.id in self.worker.jobs:  # a client-chosen X-Request-Id already in use
            job.id = f"{job.id}-{uuid.uuid4().hex[:8]}"
        try:
            position = self.worker.submit(job)
        except QueueFull:
            self.metrics.rejections.labels("queue_full").inc()
            raise
        job.emit("queued", position=position)
        return job

    async def wait(self, job: Job, request=None) -> JobResult:
        """The job's result; cancels it if the client disconnects or the deadline passes (504)."""
        self.waiting += 1
        watcher = asyncio.ensure_future(wait_disconnect(request)) if request is not None else None
        try:
            pending = {job.future} | ({watcher} if watcher else set())
            done, _ = await asyncio.wait(pending, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future in done:
                return job.future.result()
            if watcher is not None and watcher in done:
                self.worker.cancel(job.id, "disconnect")
                raise JobError(499, "client disconnected")
            self.worker.cancel(job.id, "timeout")
            raise job.cancelled_error() if job.cancel_reason == "timeout" else \
                JobError(504, f"request {job.id} ran past the service's timeout and was stopped")
        finally:
            self.waiting -= 1
            if watcher is not None:
                watcher.cancel()

    def status(self) -> dict:
        """What a client (or the web page) shows about the service."""
        limits = self.engine.limits
        running = self.worker.running
        return {
            "state": self.state, "ready": self.state == READY, "model": self.config.model,
            "backend": self.engine.pipe.runners.name if self.engine.pipe is not None else self.config.backend,
            "replica": self.config.replica, "queue_depth": len(self.worker.queue),
            "running": [{"id": job.id, "step": job.step, "steps": job.steps, "progress": round(job.progress, 4)}
                        for job in running],
            "max_batch": self.config.max_batch, "max_queue": self.config.max_queue, "timeout": self.config.timeout,
            "max_size": {"width": self.config.max_size[0], "height": self.config.max_size[1]},
            "max_steps": self.config.max_steps, "max_images": self.config.max_images,
            "size_multiple": limits.factor if limits else None, "min_size": limits.min_side if limits else None,
            "default_size": limits.default_size if limits else None,
            "default_scheduler": self.default_scheduler(),
            "schedulers": scheduler_names(), "uptime_s": round(time.time() - self.started, 1),
        }

    def default_scheduler(self) -> str | None:
        """sagrt name of the scheduler a request without one gets."""
        if self.config.scheduler is not None or self.engine.pipe is None:
            return self.config.scheduler
        return canonical_name(type(self.engine.base_scheduler).__name__)

    def job_status(self, job_id: str) -> dict | None:
        job = self.worker.jobs.get(job_id)
        if job is None:
            return None
        position = next((i for i, queued in enumerate(self.worker.queue) if queued is job), None)
        return {"id": job.id, "state": job.state, "cancelled": job.cancel_reason, "step": job.step,
                "steps": job.steps or job.params.steps, "progress": round(job.progress, 4), "position": position,
                "images": job.params.n}


async def wait_disconnect(request) -> None:
    """Returns when the client of `request` has gone (ASGI http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
