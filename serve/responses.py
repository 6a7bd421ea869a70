"""What every endpoint puts on its responses: the request's id and the headers of a finished job."""

from __future__ import annotations


def request_id(request) -> str | None:
    """The X-Request-Id the middleware gave this request."""
    return getattr(request.state, "request_id", None)


def result_headers(result) -> dict:
    """Seeds, batch composition and times of a finished job (a worker.JobResult)."""
    return {"X-Sagrt-Seeds": ",".join(map(str, result.seeds)),
            "X-Sagrt-Batch-Images": ",".join(map(str, result.batch_images)),
            "X-Sagrt-Queue-Ms": f"{result.queue_seconds * 1e3:.2f}",
            "X-Sagrt-Run-Ms": f"{result.run_seconds * 1e3:.2f}"}
