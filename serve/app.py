"""The FastAPI app of `sagrt serve`: health, readiness, metrics, status, jobs and the native endpoint; the
OpenAI and AUTOMATIC1111 endpoints are routers of their own modules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sagrt import __version__
from sagrt.serve import a1111, openai_api
from sagrt.serve.images import infotext, png_b64, png_bytes
from sagrt.serve.middleware import RequestContext
from sagrt.serve.page import add_page
from sagrt.serve.responses import request_id, result_headers
from sagrt.serve.samplers import sampler_label
from sagrt.serve.schemas import FieldError, GenerateRequest, GenerationParams
from sagrt.serve.service import READY, Service
from sagrt.serve.worker import JobError, JobResult, QueueFull

NATIVE_FIELDS = {"steps": "num_inference_steps"}
KEEPALIVE_S = 15.0  # an event-stream comment line this often while nothing else is sent


def create_app(config, service: Service | None = None) -> FastAPI:
    """The app over `service` (made from `config` if not given); the engine loads in the background when the
    app starts, so health answers at once and readiness says 503 until the model is loaded and warm."""
    service = service or Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(title="sagrt serve", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion with Self-Attention Guidance: native, OpenAI Images and "
                              "AUTOMATIC1111 endpoints")
    app.state.service = service
    app.add_middleware(RequestContext, service=service)
    add_error_handlers(app, service)
    add_health_routes(app, service)
    add_native_routes(app, service)
    app.include_router(openai_api.router(service))
    app.include_router(a1111.router(service))
    add_page(app)  # the web page: serve/page.py, serve/static/
    return app


# ---- errors -----------------------------------------------------------------------------------------------
def error_response(request: Request, status: int, message: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    """{"detail": message}; on the OpenAI path also OpenAI's {"error": {...}} so its client shows the message."""
    body: dict = {"detail": message}
    if request.url.path.startswith("/v1/images"):
        body["error"] = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                         "param": param, "code": None}
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, service: Service):
    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return error_response(request, 429, str(err), {"Retry-After": str(err.retry_after)})

    @app.exception_handler(JobError)
    async def job_error(request: Request, err: JobError):
        retry = getattr(err, "retry_after", None)
        return error_response(request, err.status, err.message, {"Retry-After": str(retry)} if retry else None)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, err: FieldError):
        body = {"detail": [{"loc": list(err.loc), "msg": err.message, "type": "value_error"}]}
        if request.url.path.startswith("/v1/images"):
            body["error"] = {"message": f"{err.loc[-1]}: {err.message}", "type": "invalid_request_error",
                             "param": err.loc[-1], "code": None}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        service.metrics.rejections.labels("invalid").inc()
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        body: dict = {"detail": details}
        if request.url.path.startswith("/v1/images") and details:
            first = details[0]
            body["error"] = {"message": f"{first['loc'][-1]}: {first['msg']}", "type": "invalid_request_error",
                             "param": str(first["loc"][-1]), "code": None}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return error_response(request, 500, f"internal error: {type(err).__name__}: {line}".rstrip(": "))


# ---- health, readiness, metrics, status -------------------------------------------------------------------
def add_health_routes(app: FastAPI, service: Service):
    @app.get("/healthz", tags=["service"])
    async def healthz():
        """Alive: the process answers (the engine may still be loading)."""
        return {"status": "alive", "replica": service.config.replica}

    @app.get("/readyz", tags=["service"])
    async def readyz():
        """200 once the model is loaded and warm; 503 while loading, draining or after a failed load."""
        state = service.state
        service.metrics.ready.set(1 if state == READY else 0)
        return JSONResponse({"state": state}, status_code=200 if state == READY else 503)

    @app.get("/metrics", tags=["service"])
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        service.metrics.queue_depth.set(len(service.worker.queue))
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", tags=["service"])
    async def status():
        """Model, backend, state, queue depth, running jobs and the service's limits."""
        return service.status()

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def job(job_id: str):
        """A queued or running job's state and progress (404 once it has been answered)."""
        found = service.job_status(job_id)
        if found is None:
            raise JobError(404, f"no queued or running job {job_id!r}")
        return found

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel(job_id: str):
        """Cancels a queued or running job; it answers 409 and its work stops after the current step."""
        if not service.worker.cancel(job_id, "cancel"):
            raise JobError(404, f"no queued or running job {job_id!r} to cancel")
        return {"id": job_id, "cancelled": True}


# ---- native endpoint --------------------------------------------------------------------------------------
def result_payload(service: Service, params: GenerationParams, result: JobResult) -> dict:
    sampler = sampler_label(service, params)
    texts = [infotext(params, seed, service.config.model, sampler) for seed in result.seeds]
    return {"images": [png_b64(image, text) for image, text in zip(result.images, texts)], "seeds": result.seeds,
            "parameters": texts, "width": params.width, "height": params.height,
            "batch_images": result.batch_images, "queue_ms": round(result.queue_seconds * 1e3, 2),
            "run_ms": round(result.run_seconds * 1e3, 2)}


def add_native_routes(app: FastAPI, service: Service):
    @app.post("/v1/generate", tags=["generate"],
              responses={200: {"content": {"image/png": {}, "application/json": {}, "text/event-stream": {}}}})
    async def generate(body: GenerateRequest, request: Request):
        """One request. Accept: image/png (default, one image), application/json (base64 PNGs and seeds), or
        text/event-stream (events queued, started, step per denoising step, then result or error)."""
        accept = request.headers.get("accept", "")
        stream, as_json = "text/event-stream" in accept, "application/json" in accept
        params = service.validate(body.params(), NATIVE_FIELDS)
        if params.n > 1 and not (stream or as_json):
            raise FieldError("n", "more than one image needs Accept: application/json or text/event-stream "
                                  "(an image/png response holds one image)")
        job = service.submit(params, request_id(request), stream=stream)
        if stream:
            return StreamingResponse(event_stream(service, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await service.wait(job, request)
        if as_json:
            return JSONResponse(result_payload(service, params, result), headers=result_headers(result))
        text = infotext(params, result.seeds[0], service.config.model, sampler_label(service, params))
        return Response(png_bytes(result.images[0], text), media_type="image/png", headers=result_headers(result))


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(service: Service, job):
    """Server-sent events of one job; closing the stream cancels the job."""
    service.waiting += 1
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            left = job.deadline - time.monotonic()
            done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, min(left, KEEPALIVE_S)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield sse(*getter.result())
                continue
            getter.cancel()
            if not job.future.done() and left > KEEPALIVE_S:  # a long wait in the queue: keep proxies from closing
                yield ": keep-alive\n\n"
                continue
            if not job.future.done():  # past the deadline
                service.worker.cancel(job.id, "timeout")
                yield sse("error", {"id": job.id, "status": 504,
                                    "message": f"request {job.id} ran past the service's timeout and was stopped"})
                return
            while not job.events.empty():  # events sent before the result
                yield sse(*job.events.get_nowait())
            try:
                result = job.future.result()
            except JobError as err:
                yield sse("error", {"id": job.id, "status": err.status, "message": err.message})
                return
            yield sse("result", {"id": job.id, **result_payload(service, job.params, result)})
            return
    finally:
        service.waiting -= 1
        if not job.future.done():
            service.worker.cancel(job.id, "disconnect")
