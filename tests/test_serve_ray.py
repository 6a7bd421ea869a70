"""`sagrt serve --ray`: a local Ray instance with two CPU replicas of tiny behind Ray's HTTP proxy. Concurrent
requests through the proxy each get the image the pipeline gives for their seed, and both replicas serve."""

import asyncio
import functools
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=1)
def pipeline():
    from sagrt.runtime import SAGPipeline

    pipe = SAGPipeline.from_pretrained("tiny", backend="torch")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_pixels(seed: int, steps: int) -> np.ndarray:
    """The image a request alone gets (one image, its own generator), made in this process."""
    image = pipeline()(["a red house"], num_inference_steps=steps, guidance_scale=[7.5], sag_scale=[0.75],
                       negative_prompt=[""], generator=[torch.Generator().manual_seed(seed)]).images[0]
    return np.asarray(image).astype(np.int16)


def assert_right(response, seed: int, steps: int):
    got = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)
    assert np.abs(got - reference_pixels(seed, steps)).max() <= 1, (seed, response.headers["x-sagrt-replica"])


@pytest.mark.slow
def test_ray_two_replicas(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "ray.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "sagrt.runtime.cli", "serve", "--ray", "--replicas", "2", "--num-cpus-per-replica",
         "1", "--model", "tiny", "--backend", "torch", "--port", str(port), "--max-batch", "2", "--max-queue", "8"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def output():
        log.flush()
        log.seek(0)
        return log.read()[-4000:]

    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, output()
            assert time.monotonic() < deadline, f"Ray Serve not up: {output()}"
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(url + "/v1/generate", json={
                    "prompt": "a red house", "seed": seed, "num_inference_steps": 4}) for seed in range(8)))

        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        assert all(r.headers["x-request-id"] and "," not in r.headers["x-request-id"] for r in responses)
        one = httpx.post(url + "/v1/generate", headers={"X-Request-Id": "ray-req-1"}, timeout=120,
                         json={"prompt": "a red house", "num_inference_steps": 2})
        assert one.headers["x-request-id"] == "ray-req-1"
        for seed, response in enumerate(responses):
            assert_right(response, seed, 4)

        async def flood():  # 2 replicas x 4 ongoing + 8 queued by Ray: the rest is refused at once
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
                return await asyncio.gather(*(client.post(url + "/v1/generate", json={
                    "prompt": "a red house", "seed": seed, "num_inference_steps": 20}) for seed in range(48)))

        flooded = asyncio.run(flood())
        codes = [r.status_code for r in flooded]
        # how many fit depends on how fast requests finish while the rest arrive: only 200 and 429, some of each
        assert set(codes) == {200, 429} and codes.count(200) >= 8, codes
        assert all(r.headers.get("retry-after") for r in flooded if r.status_code == 429)
        replicas = {r.headers["x-sagrt-replica"] for r in responses + flooded if r.status_code == 200}
        assert len(replicas) == 2, replicas  # both replicas served
        for seed, response in enumerate(flooded):
            if response.status_code == 200:
                assert_right(response, seed, 20)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait(10)
        log.close()
    assert code == 0
