"""The engine worker: one thread owns the pipeline (pipelines and schedulers are not thread-safe) and serves
a FIFO queue of jobs, merging compatible ones into one pipeline call of up to `max_batch` images.

Each image has its own generator (seed + i), and guidance and SAG scale are given per image, so an image does
not depend on what it was batched with. A job larger than the room left is split across calls. Between steps
the worker checks each job of the call for cancellation (client gone, interrupt, deadline); the call stops
once every job in it is cancelled. A failing call is retried job by job, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from sagrt.errors import SagrtError
from sagrt.serve.schemas import GenerationParams, ModelLimits

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
CANCEL_STATUS = {"timeout": 504, "disconnect": 499, "interrupt": 409, "cancel": 409, "shutdown": 503}


class JobError(Exception):
    """A job that ended without images: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full: retry in {retry_after} s")
        self.retry_after = retry_after


class _Stopped(Exception):
    """Raised from the step callback when every job of the call is cancelled."""


@dataclass
class JobResult:
    images: list  # PIL images, in seed order
    seeds: list[int]
    queue_seconds: float
    run_seconds: float
    batch_images: list[int]  # images in each pipeline call that served this job


@dataclass(eq=False)
class Job:
    """One request on its way through the worker. Created and awaited on the event loop; the worker thread
    reports to it only through `loop.call_soon_threadsafe`."""

    params: GenerationParams
    id: str
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic()
    events: asyncio.Queue | None = None  # per-step events, for streaming responses
    created: float = field(default_factory=time.monotonic)
    state: str = QUEUED
    cancel_reason: str | None = None
    assigned: int = 0  # images handed to a pipeline call
    done_images: int = 0
    step: int = 0
    steps: int = 0
    started: float | None = None
    cancel_step: int = 0  # the last finished step when the cancel came
    images: dict = field(default_factory=dict)
    batch_images: list = field(default_factory=list)

    def __post_init__(self):
        self.future: asyncio.Future = self.loop.create_future()

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    @property
    def progress(self) -> float:
        running = (self.assigned - self.done_images) * (self.step / self.steps if self.steps else 0.0)
        return (self.done_images + running) / self.params.n

    def cancel(self, reason: str) -> bool:
        """Marks the job cancelled (first reason wins); the worker stops its work at the next step."""
        if self.finished or self.cancel_reason is not None:
            return False
        self.cancel_reason, self.cancel_step = reason, self.step
        return True

    def expired(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) >= self.deadline

    def emit(self, event: str, **data) -> None:
        if self.events is not None:
            self._call(self.events.put_nowait, (event, {"id": self.id, **data}))

    def finish(self, result: JobResult | None = None, error: JobError | None = None) -> None:
        if self.finished:
            return
        self.state = DONE if error is None else CANCELLED if self.cancel_reason else FAILED
        self._call(self._resolve, result, error)

    def _resolve(self, result, error):
        if not self.future.done():
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

    def _call(self, fn, *args):
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def cancelled_error(self) -> JobError:
        reason = self.cancel_reason or "cancel"
        if reason == "timeout":
            return JobError(504, f"request {self.id} ran past the service's timeout and was stopped")
        return JobError(CANCEL_STATUS.get(reason, 409), f"request {self.id} was cancelled ({reason})")


class Worker:
    """The queue and the thread that drains it into `engine.run(slices, ...)`."""

    def __init__(self, engine, config, metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.jobs: dict[str, Job] = {}  # by id, while queued or running
        self.cond = threading.Condition()
        self.stopping = False
        self.batch_seconds = 1.0  # moving average, for Retry-After
        self.thread = threading.Thread(target=self._main, name="sagrt-engine", daemon=True)
        self.load_error: BaseException | None = None
        self.last_progress = time.monotonic()  # the last finished step or call, for health checks
        self.loaded = threading.Event()

    # ---- called from the event loop -----------------------------------------------------------------
    def start(self):
        self.thread.start()

    def submit(self, job: Job) -> int:
        """Queues a job; returns its position (0: next), or raises QueueFull."""
        with self.cond:
            if sum(1 for queued in self.queue if queued.assigned == 0) >= self.config.max_queue:
                raise QueueFull(self.retry_after())
            self.queue.append(job)
            self.jobs[job.id] = job
            self.metrics.queue_depth.set(len(self.queue))
            self.cond.notify()
            return len(self.queue) - 1

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one call's worth of requests."""
        waiting = len(self.queue) + len(self.running)
        calls = -(-waiting // self.config.max_batch)
        return max(1, round(calls * self.batch_seconds))

    def cancel(self, job_id: str, reason: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None or not self._cancel(job, reason):
            return False
        with self.cond:
            self.cond.notify()
        return True

    def _cancel(self, job: Job, reason: str) -> bool:
        if not job.cancel(reason):
            return False
        self.metrics.cancellations.labels(reason).inc()
        return True

    def cancel_running(self, reason: str) -> int:
        return sum(self.cancel(job.id, reason) for job in list(self.running))

    def stop(self, timeout: float = 5.0):
        with self.cond:
            self.stopping = True
            for job in list(self.queue) + list(self.running):
                job.cancel("shutdown")
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    # ---- the engine thread --------------------------------------------------------------------------
    def _main(self):
        try:
            self.engine.load()
        except BaseException as err:  # noqa: BLE001 - reported by readiness, never raised into the loop
            self.load_error = err
            self.loaded.set()
            return
        self.metrics.ready.set(1)
        self.loaded.set()
        while True:
            slices = self._next_batch()
            if slices is None:
                return
            try:
                if slices:
                    self._run(slices)
            except Exception as err:  # noqa: BLE001 - a bug in one batch must not end the engine thread
                for job, _, _ in slices:
                    self._end(job, error=engine_error(err))

    def _next_batch(self):
        """The oldest live job and the compatible ones behind it, up to max_batch images; [] if none is live;
        None once stopping. A lone job never waits for company."""
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                for job in list(self.queue):
                    self._drop(job)
                return None
            now = time.monotonic()
            for job in list(self.queue):
                if job.expired(now):
                    self._cancel(job, "timeout")
                if job.cancel_reason is not None:
                    self._drop(job)
            if not self.queue:
                return []
            key, room, slices = self.queue[0].params.batch_key(), self.config.max_batch, []
            for job in list(self.queue):
                if room == 0:
                    break
                if job.params.batch_key() != key:
                    continue
                count = min(job.params.n - job.assigned, room)
                slices.append((job, job.assigned, count))
                job.assigned += count
                room -= count
                if job.assigned == job.params.n:
                    self.queue.remove(job)
            self.running = [job for job, _, _ in slices]
            self.metrics.queue_depth.set(len(self.queue))
            return slices

    def _drop(self, job: Job):
        """A cancelled or expired job leaves the queue and is answered."""
        if job in self.queue:
            self.queue.remove(job)
        self.jobs.pop(job.id, None)
        job.finish(error=job.cancelled_error())
        self.metrics.queue_depth.set(len(self.queue))

    def _run(self, slices):
        start = time.monotonic()
        for job, _, _ in slices:
            if job.started is None:
                job.started = start
                job.state = RUNNING
                self.metrics.queue_wait.observe(start - job.created)
        try:
            self._run_call(slices)
        finally:
            with self.cond:
                self.running = []
            self.last_progress = time.monotonic()
            elapsed = self.last_progress - start
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * elapsed

    def _run_call(self, slices):
        images = sum(count for _, _, count in slices)
        self.metrics.batch_size.observe(images)
        for job, _, count in slices:
            job.batch_images.append(images)
            job.steps, job.step = job.params.steps, 0
            job.emit("started", batch_images=images, steps=job.params.steps, progress=job.progress)
        try:
            outputs = self.engine.run(slices, self._on_step)
        except _Stopped:
            for job, _, _ in slices:
                self._end(job, error=job.cancelled_error())
            return
        except Exception as err:  # noqa: BLE001 - a failing request must not stop the worker
            if len({id(job) for job, _, _ in slices}) > 1:
                for one in slices:  # find which request fails; the others get their images
                    if one[0].cancel_reason is None and not one[0].finished:
                        self._run_call([one])
                    else:
                        self._end(one[0], error=one[0].cancelled_error())
                return
            job = slices[0][0]
            self._end(job, error=engine_error(err))
            return
        for (job, first, count), (job_images, error) in zip(slices, outputs):
            if job.cancel_reason is not None:
                self._end(job, error=job.cancelled_error())
            elif error is not None:
                self._end(job, error=JobError(500, error))
            else:
                job.images.update({first + i: image for i, image in enumerate(job_images)})
                job.done_images += count
                if job.done_images == job.params.n:
                    self._end(job)
                # else: a split job keeps its place at the head of the queue for its next images

    def _on_step(self, slices, step: int, masks) -> None:
        """After each denoising step: progress events, deadlines, and stop if every job is cancelled."""
        now = self.last_progress = time.monotonic()
        live = 0
        for index, (job, first, count) in enumerate(slices):
            if job.cancel_reason is None and job.expired(now):
                self._cancel(job, "timeout")
            if job.cancel_reason is not None:
                continue
            live += 1
            job.step = step
            extra = {"masks": masks[index]} if masks is not None and job.params.return_masks else {}
            job.emit("step", step=step, steps=job.steps, progress=round(job.progress, 4), **extra)
        if live == 0:
            self.metrics.cancel_steps.observe(step - max(job.cancel_step for job, _, _ in slices))
            raise _Stopped()

    def _end(self, job: Job, error: JobError | None = None):
        if job.finished:
            return
        with self.cond:
            if job in self.queue:
                self.queue.remove(job)
            self.jobs.pop(job.id, None)
        if error is not None:
            job.finish(error=error)
            return
        now = time.monotonic()
        images = [job.images[i] for i in range(job.params.n)]
        job.finish(JobResult(images=images, seeds=job.params.seeds, queue_seconds=job.started - job.created,
                             run_seconds=now - job.started, batch_images=job.batch_images))


def engine_error(err: BaseException) -> JobError:
    """422 for input the pipeline refuses (SagrtError), 500 otherwise; one line either way."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, SagrtError):
        return JobError(422, text)
    return JobError(500, f"generation failed: {type(err).__name__}: {text}")


__all__ = ["Job", "JobError", "JobResult", "ModelLimits", "QueueFull", "Worker"]
