"""`sagrt serve --ray`: a local Ray instance with two CPU replicas of tiny behind Ray's HTTP proxy. Concurrent
requests through the proxy each get the image the pipeline gives for their seed, and both replicas serve."""

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_pixels(seed: int) -> np.ndarray:
    from sagrt.runtime import SAGPipeline

    pipe = SAGPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(["a red house"], num_inference_steps=4, guidance_scale=[7.5], sag_scale=[0.75], negative_prompt=[""],
                 generator=[torch.Generator().manual_seed(seed)]).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.mark.slow
def test_ray_two_replicas(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "ray.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "sagrt.runtime.cli", "serve", "--ray", "--replicas", "2", "--num-cpus-per-replica",
         "1", "--model", "tiny", "--backend", "torch", "--port", str(port), "--max-batch", "2"],
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
                    "prompt": "a red house", "seed": seed, "num_inference_steps": 4}) for seed in range(16)))

        responses = asyncio.run(burst())
        replicas = {r.headers["x-sagrt-replica"] for r in responses}
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        assert len(replicas) == 2, replicas
        for seed in (0, 7, 15):
            got = np.asarray(Image.open(io.BytesIO(responses[seed].content)).convert("RGB")).astype(np.int16)
            assert np.abs(got - reference_pixels(seed)).max() <= 1, seed
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
