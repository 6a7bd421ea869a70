"""`sagrt serve` against a real uvicorn server on 127.0.0.1 (tiny model, torch backend): endpoints and their
schemas, batching that gives each request the images it gets alone, progress events, cancellation on
disconnect and cancel, backpressure (429/413/422/504), readiness through load and drain, metrics, faults."""

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import relative_error

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parent.parent
FAULT_SEED = 666


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m sagrt.runtime.cli serve ...` in a subprocess; records what /readyz said until ready."""

    def __init__(self, tmp_path, *options):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"serve-{self.port}.log", "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SAGRT_SERVE_FAULT_SEED": str(FAULT_SEED),
               "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sagrt.runtime.cli", "serve", "--model", "tiny", "--backend", "torch",
             "--port", str(self.port), "--log-level", "warning", *options],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.readiness = self.wait_ready()

    def wait_ready(self, limit: float = 120.0) -> list:
        seen, deadline = [], time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.output()}"
            try:
                response = httpx.get(self.url + "/readyz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append((response.status_code, response.json()["state"]))
            if response.status_code == 200:
                return seen
            time.sleep(0.05)
        raise AssertionError(f"not ready after {limit} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--max-queue", "4", "--max-size", "128x128",
                 "--max-steps", "400", "--max-body-kb", "16", "--timeout", "60")
    yield srv
    assert srv.stop() == 0, srv.output()


def generate(url, timeout=60, headers=None, **body):
    return httpx.post(url + "/v1/generate", json={"prompt": "a red house", **body}, headers=headers, timeout=timeout)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def metrics(url) -> dict:
    """{(name, labels...): value} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            values[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return values


def sse_events(response):
    """(event, data) pairs of a text/event-stream response, as they arrive."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


async def post_many(url, bodies, headers=None):
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(client.post(url + "/v1/generate", json=body, headers=headers)
                                      for body in bodies))


def wait_running(url, job_id, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}")
        if status.status_code == 200 and status.json()["state"] == "running" and status.json()["step"] > 0:
            return status.json()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ran")


# ---- the loop: per-image scales and generators ----------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm-sde"])
def test_pipeline_batch_equals_alone(tiny, scheduler):
    """Images in one call with different seeds and scales equal the same images made one by one (the
    scheduler's own noise comes from each image's generator)."""
    from sagrt.runtime.pipeline import SAGPipeline
    from sagrt.runtime.schedulers import make_scheduler

    pipe = SAGPipeline.from_pretrained("tiny", backend="torch")
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seeds, guidance, sag = [3, 4, 5], [3.0, 7.5, 9.0], [0.3, 0.75, 1.0]
    gens = lambda chosen: [torch.Generator().manual_seed(s) for s in chosen]  # noqa: E731
    batch = pipe(["a cat", "a dog", "a cat"], num_inference_steps=6, guidance_scale=guidance, sag_scale=sag,
                 generator=gens(seeds), output_type="latent").images
    worst = 0.0
    for i in range(3):
        alone = pipe(["a cat", "a dog", "a cat"][i], num_inference_steps=6, guidance_scale=guidance[i],
                     sag_scale=sag[i], generator=gens([seeds[i]]), output_type="latent").images
        worst = max(worst, relative_error(batch[i:i + 1], alone))
    print(f"{scheduler}: batch of 3 vs alone, worst final-latent relative error {worst:.2e}")
    assert worst <= 1e-3  # docs/design.md's loop bound
    lone = pipe("a cat", num_inference_steps=6, guidance_scale=9.0, sag_scale=1.0, generator=gens([3]),
                output_type="latent").images
    assert relative_error(lone, batch[0:1]) > 1e-2  # the scales do reach the images


def test_pipeline_refuses_mixed_guidance(tiny):
    from sagrt.runtime.pipeline import InputError, SAGPipeline

    pipe = SAGPipeline.from_pretrained("tiny", backend="torch")
    with pytest.raises(InputError, match="guidance_scale values .* on both sides of 1.0"):
        pipe(["a", "b"], num_inference_steps=1, guidance_scale=[1.0, 7.5], output_type="latent")
    with pytest.raises(InputError, match="a list of 2 generators but the call makes 3 images"):
        pipe(["a", "b", "c"], num_inference_steps=1, generator=[torch.Generator()] * 2, output_type="latent")


# ---- endpoints ------------------------------------------------------------------------------------------------
def test_readiness_through_load(server):
    assert server.readiness[0] == (503, "loading"), server.readiness  # listening before the model is ready
    assert server.readiness[-1] == (200, "ready")
    health = httpx.get(server.url + "/healthz")
    assert health.status_code == 200 and health.headers["x-sagrt-replica"].endswith(f":{server.process.pid}")


def test_native_png(server):
    response = generate(server.url, seed=7, num_inference_steps=4, headers={"X-Request-Id": "my-req-1"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-request-id"] == "my-req-1"
    assert response.headers["x-sagrt-seeds"] == "7"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (64, 64)
    assert "Seed: 7" in image.text["parameters"] and "SAG scale: 0.75" in image.text["parameters"]
    again = generate(server.url, seed=7, num_inference_steps=4)
    assert again.headers["x-request-id"] != "my-req-1"
    assert np.array_equal(png_pixels(again.content), png_pixels(response.content))  # same seed, same image


def test_native_json_and_status(server):
    response = generate(server.url, seed=1, n=2, num_inference_steps=3, width=96, height=64,
                        headers={"Accept": "application/json"})
    body = response.json()
    assert response.status_code == 200 and body["seeds"] == [1, 2] and len(body["images"]) == 2
    first = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert first.size == (96, 64)
    status = httpx.get(server.url + "/v1/status").json()
    assert status["ready"] and status["model"] == "tiny" and status["backend"] == "torch"
    assert status["max_batch"] == 4 and "euler-a" in status["schedulers"] and status["queue_depth"] == 0


def test_event_stream_progress_and_masks(server):
    body = {"prompt": "a boat", "seed": 3, "num_inference_steps": 5, "return_masks": True}
    with httpx.stream("POST", server.url + "/v1/generate", json=body, headers={"Accept": "text/event-stream"},
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    names = [name for name, _ in events]
    assert names == ["queued", "started"] + ["step"] * 5 + ["result"], names
    steps = [data for name, data in events if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and steps[-1]["progress"] == 1.0
    mask = Image.open(io.BytesIO(base64.b64decode(steps[0]["masks"][0])))
    assert mask.size == (8, 8) and set(np.unique(np.asarray(mask))) <= {0, 255}
    result = events[-1][1]
    alone = generate(server.url, prompt="a boat", seed=3, num_inference_steps=5)
    assert np.array_equal(png_pixels(base64.b64decode(result["images"][0])), png_pixels(alone.content))


def test_batched_requests_equal_alone(server):
    """Four requests with distinct seeds and scales merged into one call (behind a running request) give
    the images each gives alone."""
    common = {"prompt": "a tree", "num_inference_steps": 12, "scheduler": "euler-a"}
    bodies = [{**common, "seed": 100 + i, "guidance_scale": g, "sag_scale": s}
              for i, (g, s) in enumerate([(3.0, 0.3), (5.0, 0.5), (7.5, 0.75), (9.0, 1.0)])]
    blocker = {**common, "num_inference_steps": 120, "sag_scale": 0.0, "seed": 1}  # another batch key

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.ensure_future(client.post(server.url + "/v1/generate", json=blocker))
            await asyncio.sleep(0.3)
            merged = await asyncio.gather(*(client.post(server.url + "/v1/generate", json=b) for b in bodies))
            await first
            return merged

    merged = asyncio.run(scenario())
    alone = [generate(server.url, **body) for body in bodies]
    worst = 0
    for together, single in zip(merged, alone):
        assert together.status_code == single.status_code == 200
        assert together.headers["x-sagrt-batch-images"] == "4" and single.headers["x-sagrt-batch-images"] == "1"
        worst = max(worst, int(np.abs(png_pixels(together.content) - png_pixels(single.content)).max()))
    print(f"batched vs alone (euler-a, 4 requests): largest pixel difference {worst} of 255")
    assert worst <= 1  # 8-bit rounding of float differences within the loop bound
    images = [png_pixels(r.content) for r in merged]
    assert all(np.abs(images[0] - other).max() > 10 for other in images[1:])  # not one image four times


def test_split_request_equals_one_call(server):
    """A request of more images than --max-batch is served in several calls with the same images."""
    response = generate(server.url, seed=20, n=6, num_inference_steps=3, headers={"Accept": "application/json"})
    assert response.status_code == 200 and response.headers["x-sagrt-batch-images"] == "4,2"
    sixth = generate(server.url, seed=25, num_inference_steps=3)
    image = base64.b64decode(response.json()["images"][5])
    assert np.abs(png_pixels(image) - png_pixels(sixth.content)).max() <= 1


def test_openvino_backend_serves_a_batch_as_alone(tmp_path):
    """The openvino runners (one compilation per input shapes, made while serving) through the service: a
    request of two images in one call gives the images each seed gives alone."""
    pytest.importorskip("openvino", reason='the openvino backend needs OpenVINO (pip install ".[openvino]")')
    srv = Server(tmp_path, "--backend", "openvino", "--export-dir", str(tmp_path / "export"), "--max-batch", "2")
    try:
        response = generate(srv.url, seed=30, n=2, num_inference_steps=3, headers={"Accept": "application/json"})
        assert response.status_code == 200 and response.headers["x-sagrt-batch-images"] == "2"
        second = generate(srv.url, seed=31, num_inference_steps=3)
        assert second.status_code == 200 and second.headers["x-sagrt-batch-images"] == "1"
        image = base64.b64decode(response.json()["images"][1])
        assert np.abs(png_pixels(image) - png_pixels(second.content)).max() <= 1
    finally:
        assert srv.stop() == 0, srv.output()


# ---- cancellation ---------------------------------------------------------------------------------------------
def test_disconnect_cancels_within_a_step(server):
    before = metrics(server.url)
    with httpx.stream("POST", server.url + "/v1/generate", headers={"Accept": "text/event-stream"}, timeout=60,
                      json={"prompt": "a car", "num_inference_steps": 400, "width": 128, "height": 128}) as response:
        for name, data in sse_events(response):
            if name == "step" and data["step"] == 2:
                job_id = data["id"]
                break
    # the stream is closed: the job stops at its next step and the worker moves on
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/v1/jobs/{job_id}").status_code == 200:
        assert time.monotonic() < deadline, "the job kept running after the client left"
        time.sleep(0.02)
    after = metrics(server.url)
    key = ("sagrt_cancellations_total", ("reason", "disconnect"))
    assert after[key] == before.get(key, 0) + 1
    ran = after[("sagrt_cancel_steps_sum",)] - before.get(("sagrt_cancel_steps_sum",), 0)
    assert after[("sagrt_cancel_steps_count",)] - before.get(("sagrt_cancel_steps_count",), 0) == 1
    assert ran <= 1, f"{ran} steps ran after the cancel"
    assert generate(server.url, num_inference_steps=2).status_code == 200


def test_png_client_disconnect_cancels(server):
    before = metrics(server.url).get(("sagrt_cancellations_total", ("reason", "disconnect")), 0)
    with pytest.raises(httpx.ReadTimeout):
        generate(server.url, timeout=httpx.Timeout(60, read=1.0), num_inference_steps=400, width=128, height=128,
                 headers={"X-Request-Id": "leaving"})
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/v1/jobs/leaving").status_code == 200:
        assert time.monotonic() < deadline, "the job kept running after the client left"
        time.sleep(0.02)
    assert metrics(server.url)[("sagrt_cancellations_total", ("reason", "disconnect"))] == before + 1


def test_cancel_endpoint_stops_the_job(server):
    body = {"prompt": "a lamp", "num_inference_steps": 400, "width": 128, "height": 128}
    with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=60,
                      headers={"Accept": "text/event-stream", "X-Request-Id": "to-cancel"}) as response:
        events = sse_events(response)
        for name, data in events:
            if name == "step":
                assert httpx.post(server.url + "/v1/jobs/to-cancel/cancel").json() == {"id": "to-cancel",
                                                                                        "cancelled": True}
                break
        rest = [(name, data) for name, data in events]
    assert rest[-1][0] == "error" and rest[-1][1]["status"] == 409 and "cancelled" in rest[-1][1]["message"]
    assert len([name for name, _ in rest if name == "step"]) <= 2
    assert httpx.post(server.url + "/v1/jobs/to-cancel/cancel").status_code == 404


# ---- backpressure and bad input -------------------------------------------------------------------------------
def test_full_queue_answers_429_at_once(server):
    long = {"prompt": "a wall", "num_inference_steps": 400, "width": 128, "height": 128, "sag_scale": 0.0}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            # one running, then four queued (different step counts: they cannot share a call)
            def fill(i):
                body = {**long, "seed": i, "num_inference_steps": 400 - i}
                return asyncio.ensure_future(client.post(server.url + "/v1/generate", json=body,
                                                         headers={"X-Request-Id": f"fill-{i}"}))

            tasks = [fill(0)]
            await asyncio.get_running_loop().run_in_executor(None, wait_running, server.url, "fill-0")
            tasks += [fill(i) for i in range(1, 5)]
            for _ in range(200):
                if (await client.get(server.url + "/v1/status")).json()["queue_depth"] == 4:
                    break
                await asyncio.sleep(0.05)
            start = time.monotonic()
            refused = await client.post(server.url + "/v1/generate", json={**long, "num_inference_steps": 2})
            elapsed = time.monotonic() - start
            for i in range(5):
                await client.post(f"{server.url}/v1/jobs/fill-{i}/cancel")
            return refused, elapsed, await asyncio.gather(*tasks)

    refused, elapsed, filled = asyncio.run(scenario())
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["detail"]
    assert elapsed < 1.0
    assert sorted(r.status_code for r in filled) == [409] * 5  # cancelled, all answered


def test_body_over_limit_413(server):
    response = generate(server.url, negative_prompt="x" * 20000)
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]
    assert response.headers["x-request-id"] and response.headers["x-sagrt-replica"]


@pytest.mark.parametrize("body, field, message", [
    ({"width": 60}, "width", "multiple of 8"),
    ({"height": 256}, "height", "maximum of 128"),
    ({"num_inference_steps": 401}, "num_inference_steps", "maximum of 400"),
    ({"num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
    ({"guidance_scale": "lots"}, "guidance_scale", "valid number"),
    ({"sag_blur_kernel": 8}, "sag_blur_kernel", "odd"),
    ({"sag_window": [0.5, 0.2]}, "sag_window", "start < end"),
    ({"scheduler": "nope"}, "scheduler", "unknown scheduler"),
    ({"scheduler": "ddim", "karras_sigmas": True}, "karras_sigmas", "no Karras"),
    ({"n": 2}, "n", "Accept: application/json"),
    ({"n": 9}, "n", "maximum of 8"),
    ({"cfg": 3}, "cfg", "Extra inputs"),
])
def test_invalid_fields_422(server, body, field, message):
    response = generate(server.url, **body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == field and message in detail["msg"], detail


def test_failing_request_fails_alone(server):
    """A request that fails inside the engine answers 500 with one line; its batch neighbour and the next
    request get their images."""
    common = {"prompt": "a fox", "num_inference_steps": 6}
    good = generate(server.url, seed=5, **common)
    blocker = {**common, "num_inference_steps": 100, "sag_scale": 0.0}
    responses = asyncio.run(post_many(server.url, [blocker, {**common, "seed": FAULT_SEED}, {**common, "seed": 5}]))
    failed, neighbour = responses[1], responses[2]
    assert failed.status_code == 500 and failed.json()["detail"].count("\n") == 0
    assert f"injected fault for seed {FAULT_SEED}" in failed.json()["detail"]
    assert neighbour.status_code == 200 and np.abs(png_pixels(neighbour.content) - png_pixels(good.content)).max() <= 1
    assert generate(server.url, **common).status_code == 200


def test_metric_names(server):
    from sagrt.serve.metrics import METRIC_NAMES

    assert generate(server.url, num_inference_steps=2).status_code == 200
    assert generate(server.url, width=60).status_code == 422
    text = httpx.get(server.url + "/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')} " in text or f"# TYPE {name} " in text, name
    values = metrics(server.url)
    assert values[("sagrt_requests_total", ("endpoint", "/v1/generate"), ("status", "200"))] >= 1
    assert values[("sagrt_requests_total", ("endpoint", "/v1/generate"), ("status", "422"))] >= 1
    assert values[("sagrt_rejections_total", ("reason", "invalid"))] >= 1
    assert values[("sagrt_batch_size_count",)] >= 1 and values[("sagrt_step_seconds_count",)] >= 1
    assert values[("sagrt_ready",)] == 1 and values[("sagrt_in_flight",)] == 1  # this /metrics request


def test_readiness_while_busy(server):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            work = asyncio.ensure_future(client.post(server.url + "/v1/generate",
                                                     json={"prompt": "a hill", "num_inference_steps": 60}))
            await asyncio.sleep(0.3)
            start = time.monotonic()
            ready = await client.get(server.url + "/readyz")
            return ready, time.monotonic() - start, await work

    ready, elapsed, work = asyncio.run(scenario())
    assert ready.status_code == 200 and elapsed < 0.5 and work.status_code == 200


# ---- deadlines and shutdown (a server of their own) -----------------------------------------------------------
def test_timeout_504_then_drain_on_sigterm(tmp_path):
    # the deadline leaves the in-flight request below time to finish even on a busy machine
    srv = Server(tmp_path, "--timeout", "10", "--drain-timeout", "20", "--max-size", "128x128", "--max-steps", "1000")
    try:
        start = time.monotonic()
        late = generate(srv.url, num_inference_steps=990, width=128, height=128)
        assert late.status_code == 504 and "timeout" in late.json()["detail"]
        assert 10 <= time.monotonic() - start < 16  # answered at the deadline (loose: the machine is shared)
        assert metrics(srv.url)[("sagrt_cancellations_total", ("reason", "timeout"))] == 1

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                work = asyncio.ensure_future(client.post(srv.url + "/v1/generate", headers={"X-Request-Id": "last"},
                                                         json={"prompt": "a road", "num_inference_steps": 30}))
                await asyncio.get_running_loop().run_in_executor(None, wait_running, srv.url, "last")
                srv.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                ready = await client.get(srv.url + "/readyz")
                refused = await client.post(srv.url + "/v1/generate", json={"prompt": "too late"})
                return ready, refused, await work

        ready, refused, work = asyncio.run(scenario())
        assert ready.status_code == 503 and ready.json()["state"] == "draining"
        assert refused.status_code == 503 and "draining" in refused.json()["detail"]
        assert work.status_code == 200 and work.headers["content-type"] == "image/png"  # in-flight finished
        assert srv.process.wait(20) == 0, srv.output()
    finally:
        srv.stop()


# ---- OpenAI and AUTOMATIC1111 --------------------------------------------------------------------------------
def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    result = client.images.generate(prompt="a red house", n=2, size="96x64", response_format="b64_json",
                                    extra_body={"seed": 7, "num_inference_steps": 4, "sag_scale": 0.75})
    assert len(result.data) == 2 and result.data[0].revised_prompt is None
    first = base64.b64decode(result.data[0].b64_json)
    assert Image.open(io.BytesIO(first)).size == (96, 64)
    native = generate(server.url, seed=7, num_inference_steps=4, width=96, height=64)
    assert np.abs(png_pixels(first) - png_pixels(native.content)).max() <= 1  # 2 images in one call vs 1
    with pytest.raises(openai.BadRequestError, match="use response_format b64_json"):
        client.images.generate(prompt="a house", response_format="url")
    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.generate(prompt="a house", size="big")


def test_a1111_txt2img(server):
    body = {"prompt": "a tree", "negative_prompt": "fog", "steps": 5, "cfg_scale": 6.0, "width": 64, "height": 64,
            "seed": 42, "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a", "sag_scale": 0.5,
            "enable_hr": False, "restore_faces": False}
    response = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    info = json.loads(payload["info"])
    assert info["all_seeds"] == [42, 43, 44, 45] and info["sampler_name"] == "Euler a" and len(payload["images"]) == 4
    assert payload["parameters"]["sampler_name"] == "Euler a" and "Sampler: Euler a" in info["infotexts"][1]
    native = generate(server.url, prompt="a tree", negative_prompt="fog", num_inference_steps=5, guidance_scale=6.0,
                      seed=43, scheduler="euler-a", sag_scale=0.5)
    assert np.abs(png_pixels(base64.b64decode(payload["images"][1])) - png_pixels(native.content)).max() <= 1
    karras = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=60,
                        json={"prompt": "x", "steps": 3, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert karras.status_code == 200 and json.loads(karras.json()["info"])["sampler_name"] == "DPM++ 2M Karras"
    random_seed = json.loads(httpx.post(server.url + "/sdapi/v1/txt2img", timeout=60,
                                        json={"prompt": "x", "steps": 2, "seed": -1}).json()["info"])["seed"]
    assert random_seed >= 0
    bad = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "sampler_name"
    too_many = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 3, "n_iter": 3})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"][-1] == "batch_size"


def test_a1111_listings(server):
    samplers = httpx.get(server.url + "/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= set(names)
    assert next(s for s in samplers if s["name"] == "Euler a")["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    models = httpx.get(server.url + "/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny" and models[0]["title"] == f"tiny [{models[0]['hash']}]"
    assert len(models[0]["hash"]) == 10


def test_openapi_lists_every_endpoint(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/generate", "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/progress",
                 "/sdapi/v1/interrupt", "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/v1/status", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/cancel", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"prompt", "sag_scale", "sag_window", "return_masks", "scheduler"} <= set(fields)
    assert fields["num_inference_steps"]["minimum"] == 1


def test_a1111_progress_and_interrupt(server):
    body = {"prompt": "a lake", "steps": 400, "width": 128, "height": 128}
    before = metrics(server.url)

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            work = asyncio.ensure_future(client.post(server.url + "/sdapi/v1/txt2img", json=body))
            for _ in range(500):
                progress = (await client.get(server.url + "/sdapi/v1/progress")).json()
                if progress["state"]["sampling_step"] > 0:
                    break
                await asyncio.sleep(0.02)
            interrupted = (await client.post(server.url + "/sdapi/v1/interrupt")).json()
            start = time.monotonic()
            answer = await work
            return progress, interrupted, answer, time.monotonic() - start

    progress, interrupted, answer, elapsed = asyncio.run(scenario())
    assert progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1
    assert interrupted == {"interrupted": 1}
    assert answer.status_code == 409 and "interrupt" in answer.json()["detail"]
    assert elapsed < 2.0
    after = metrics(server.url)
    stopped = after[("sagrt_cancel_steps_count",)] - before.get(("sagrt_cancel_steps_count",), 0)
    ran = after[("sagrt_cancel_steps_sum",)] - before.get(("sagrt_cancel_steps_sum",), 0)
    assert stopped == 1 and ran <= 1, f"{ran} steps after the interrupt"
    idle = httpx.get(server.url + "/sdapi/v1/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0


# ---- the command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (["--max-size", "big"], "--max-size 'big' must be WIDTHxHEIGHT"),
    (["--max-batch", "0"], "--max-batch must be an integer >= 1"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--scheduler", "nope"], "unknown scheduler 'nope'"),
])
def test_cli_refuses_bad_options(capsys, options, message):
    from sagrt.runtime.cli import main

    assert main(["serve", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_cli_refuses_a_taken_port(capsys):
    from sagrt.runtime.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert main(["serve", "--port", str(sock.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
