"""ASGI plumbing shared by every endpoint: request ids, replica header, body limit, request metrics."""

from __future__ import annotations

import json
import re
import time
import uuid

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
ENDPOINTS = ("/v1/generate", "/v1/images/generations", "/v1/status", "/healthz", "/readyz", "/metrics",
             "/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/samplers",
             "/sdapi/v1/sd-models", "/sdapi/v1/options", "/")


def endpoint_label(path: str) -> str:
    """A bounded set of metric labels: known paths as they are, job paths by template, the rest 'other'."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}/cancel" if path.endswith("/cancel") else "/v1/jobs/{id}"
    return "other"


class RequestContext:
    """Pure ASGI middleware (streaming and disconnects pass through untouched): gives each request an id
    (the client's X-Request-Id when it is a plain token), adds X-Request-Id and X-Sagrt-Replica to every
    response, answers 413 for a body over the limit before the app sees it, and counts requests."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics, config = self.service.metrics, self.service.config
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        endpoint, start, status = endpoint_label(scope["path"]), time.perf_counter(), [500]
        extra = [(b"x-request-id", request_id.encode()), (b"x-sagrt-replica", config.replica.encode())]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        metrics.in_flight.inc()
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await read_body(receive, headers, config.max_body_bytes)
                if body is None:
                    metrics.rejections.labels("too_large").inc()
                    return await send_json(send_with_headers, 413, {"detail": f"request body is over the limit of "
                                                                              f"{config.max_body_bytes} bytes"})
                receive = replay(body, receive)
            await self.app(scope, receive, send_with_headers)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(status[0])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


async def read_body(receive, headers: dict, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it is known to exceed `limit` bytes."""
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive):
    """An ASGI receive that gives the buffered body once, then the client's own messages (disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def send_json(send, status: int, payload: dict, headers: list | None = None):
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
