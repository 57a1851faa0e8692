"""The HTTP server (issue 6): the API, batching, limits, draining, the playground page and a schema fuzz.

Apps are built in-process around the session's tiny trained run. Most tests talk to them through
httpx's ASGI transport; the ones about sockets (client disconnect, SIGTERM, the browser, the fuzzer, the
CLI) run a real uvicorn server on a free 127.0.0.1 port. Model work is kept to a few sampler steps.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.errors import UsageError
from ditkit.runs import load_model
from ditkit.sampling import sample_batch, to_uint8
from ditkit.serve import ServeSettings, create_app
from ditkit.serve.app import make_server, parse_prompt
from ditkit.serve.batcher import Batch, Batcher, Job, QueueFull
from ditkit.serve.limits import RateLimiter
from ditkit.settings import DEFAULT_SAMPLER, SamplingSettings
from ditkit.utils import image_seeds, native_bf16

FAST = {"steps": 3}  # sampler steps in requests that run the model: a few ms each for DiT-T/4
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a small shared CPU, two threads spin against each other (far slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(tiny_run, device="cpu")


def settings(**kw) -> ServeSettings:
    base = {"rate_limit": 0.0, "timeout_s": 30.0, "grace_s": 10.0}
    base.update(kw)
    return ServeSettings(**base)


async def wait_for(cond, timeout_s: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def asgi_client(app, client_addr=("127.0.0.1", 40000)):
    """The app's lifespan plus an httpx client on the ASGI transport; waits until /readyz says ready."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client_addr)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as c:
            await wait_for(lambda: app.state.service.state in ("ready", "failed"), what="readiness")
            yield c


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def live_server(app):
    """A real uvicorn server on this event loop (main thread: it installs its signal handlers)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = make_server(app, log_level="warning", access_log=False)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started or task.done(), what="server start")
        await wait_for(lambda: app.state.service.state == "ready", what="readiness")
        yield server, task, f"http://127.0.0.1:{port}"
    finally:
        if not task.done():
            server.should_exit = True
            await asyncio.wait_for(task, 20)
        sock.close()


@contextmanager
def server_thread(app):
    """A real uvicorn server in a background thread (for synchronous clients: a browser, a fuzzer)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = make_server(app, log_level="warning", access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("the server did not become ready")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if "{" in key:
            sample, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(",")))
        else:
            sample, got = key, ""
        if sample == name and got == want:
            return float(value)
    return 0.0


def library_images(model, labels, seed, scale, *, steps, sampler=DEFAULT_SAMPLER) -> np.ndarray:
    """What `ditkit sample` computes for a request: the library called directly, the request's images as one batch."""
    n = len(labels)
    x = sample_batch(model, labels, image_seeds(seed, n), SamplingSettings(sampler=sampler, steps=steps,
                                                                           cfg_scale=(scale,) * n))
    return to_uint8(x)[..., 0]  # (n, H, W) for 1-channel MNIST


# -------------------------------------------------------------------------------------------------
# The API
# -------------------------------------------------------------------------------------------------
def test_probes_docs_and_metrics(model):
    async def main():
        app = create_app(model=model, settings=settings())
        async with asgi_client(app) as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            r = await c.get("/readyz")
            assert r.status_code == 200 and r.json()["status"] == "ready"
            info = (await c.get("/v1/model")).json()
            assert info["num_classes"] == 10 and info["class_names"][7] == "7"
            assert "adaptive" not in info["samplers"] and "dpm++2m" in info["samplers"]
            spec = (await c.get("/openapi.json")).json()
            body = spec["components"]["schemas"]["GenerateRequest"]["properties"]
            assert body["num_samples"]["maximum"] == 16 and body["labels"]["items"]["maximum"] == 9
            assert set(body["sampler"]["enum"]) == set(info["samplers"])
            assert (await c.get("/docs")).status_code == 200
            r = await c.post("/v1/generate", json={"labels": [3], **FAST})
            assert r.status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_http_requests_total", route="/v1/generate", method="POST", code="200") == 1
            assert metric(text, "ditkit_http_requests_total", route="/healthz", method="GET", code="200") == 1
            assert metric(text, "ditkit_http_request_duration_seconds_count", route="/v1/generate") == 1
            assert metric(text, "ditkit_queue_wait_seconds_count") == 1
            assert metric(text, "ditkit_batch_size_images_sum") == 1
            assert metric(text, "ditkit_queue_depth") == 0
            assert metric(text, "ditkit_ready") == 1
            assert "ditkit_rejections_total" in text
            await c.get("/no/such/page")
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_http_requests_total", route="other", method="GET", code="404") == 1
    asyncio.run(main())


def test_generate_png_and_json_match_the_library(model):
    async def main():
        app = create_app(model=model, settings=settings())
        async with asgi_client(app) as c:
            r = await c.post("/v1/generate", json={"prompt": "seven", "num_samples": 3, "seed": 11,
                                                   "guidance_scale": 3.0, "format": "json", **FAST})
            assert r.status_code == 200, r.text
            d = r.json()
            assert d["labels"] == [7, 7, 7] and d["seed"] == 11 and d["seeds"] == image_seeds(11, 3)
            assert d["latency_ms"] >= d["queue_ms"] >= 0
            got = np.stack([png_pixels(base64.b64decode(s)) for s in d["images"]])
            assert got.shape == (3, 28, 28)
            # Alone in its batch, a request is exactly the library's batch: bit-identical images.
            np.testing.assert_array_equal(got, library_images(model, [7, 7, 7], 11, 3.0, steps=3))

            r = await c.post("/v1/generate", json={"labels": [4], "seed": 5, **FAST})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.headers["x-seed"] == "5" and r.headers["x-labels"] == "4"
            np.testing.assert_array_equal(png_pixels(r.content), library_images(model, [4], 5, 1.0, steps=3)[0])

            r = await c.post("/v1/generate", json={"labels": [0, 1], "num_samples": 4, **FAST})  # a grid, labels cycled
            assert r.status_code == 200 and png_pixels(r.content).shape == (2 + 2 * 30, 2 + 2 * 30)
            assert r.headers["x-labels"] == "0,1,0,1"
            seed = int(r.headers["x-seed"])  # drawn at random, reported, and reusable
            assert 0 <= seed < 2**53
            again = await c.post("/v1/generate", json={"labels": [0, 1], "num_samples": 4, "seed": seed, **FAST})
            assert again.content == r.content
    asyncio.run(main())


def test_prompts():
    names = [str(i) for i in range(10)]
    assert parse_prompt("7", names) == 7
    assert parse_prompt("seven", names) == 7
    assert parse_prompt("  Seven. ", names) == 7
    assert parse_prompt("zero", names) == 0
    assert parse_prompt("eleven", names) is None
    assert parse_prompt("10", names) is None
    assert parse_prompt("cat", ["cat", "dog"]) == 0
    assert parse_prompt("1", ["cat", "dog"]) == 1
    assert parse_prompt("seven", ["cat", "dog"]) is None
    for digit_like in ("²", "①", "٧", "7²"):  # str.isdigit() holds; int() refuses or reads another script
        assert parse_prompt(digit_like, names) is None, digit_like


BAD_BODIES = [
    ({"labels": [10]}, ["body", "labels", 0]),
    ({"labels": [-1]}, ["body", "labels", 0]),
    ({"labels": []}, ["body", "labels"]),
    ({"labels": ["3"]}, ["body", "labels", 0]),
    ({"labels": [3.5]}, ["body", "labels", 0]),
    ({"labels": [True]}, ["body", "labels", 0]),
    ({"labels": [1] * 17}, ["body", "labels"]),
    ({"labels": [1], "num_samples": 0}, ["body", "num_samples"]),
    ({"labels": [1], "num_samples": 17}, ["body", "num_samples"]),
    ({"labels": [1, 2, 3], "num_samples": 2}, ["body", "labels"]),
    ({"labels": [1], "steps": 0}, ["body", "steps"]),
    ({"labels": [1], "steps": 1001}, ["body", "steps"]),
    ({"labels": [1], "steps": "20"}, ["body", "steps"]),
    ({"labels": [1], "guidance_scale": -1}, ["body", "guidance_scale"]),
    ({"labels": [1], "guidance_scale": 21}, ["body", "guidance_scale"]),
    ({"labels": [1], "guidance_scale": "4"}, ["body", "guidance_scale"]),
    ({"labels": [1], "autoguidance": -1}, ["body", "autoguidance"]),
    ({"labels": [1], "autoguidance": 21}, ["body", "autoguidance"]),
    ({"labels": [1], "sampler": "nope"}, ["body", "sampler"]),
    ({"labels": [1], "sampler": "adaptive"}, ["body", "sampler"]),
    ({"labels": [1], "seed": -1}, ["body", "seed"]),
    ({"labels": [1], "seed": 2**63}, ["body", "seed"]),
    ({"labels": [1], "format": "gif"}, ["body", "format"]),
    ({"labels": [1], "colour": "red"}, ["body", "colour"]),
    ({"prompt": "eleven"}, ["body", "prompt"]),
    ({"prompt": ""}, ["body", "prompt"]),
    ({"prompt": "7", "labels": [7]}, ["body", "prompt"]),
    ({}, ["body", "labels"]),
]


def test_validation_errors_are_422_with_the_field(model):
    async def main():
        app = create_app(model=model, settings=settings())
        async with asgi_client(app) as c:
            for body, loc in BAD_BODIES:
                r = await c.post("/v1/generate", json=body)
                assert r.status_code == 422, (body, r.text)
                locs = [e["loc"] for e in r.json()["detail"]]
                assert loc in locs, (body, locs)
                assert all(e["msg"] for e in r.json()["detail"])
            for raw in (b"{not json", b"[1, 2]", b"null", b'"seven"', b'{"labels": [1], "guidance_scale": NaN}'):
                r = await c.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 422, (raw, r.text)
            r = await c.post("/v1/generate", content=b'{"labels": [1]}' + b" " * 70_000,
                             headers={"content-type": "application/json"})
            assert r.status_code == 413

            async def chunks():  # no Content-Length: the cap still holds
                for _ in range(40):
                    yield b" " * 2048
            r = await c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert (await c.get("/v1/generate")).status_code == 405
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_rejections_total", reason="body_too_large") == 2
            assert metric(text, "ditkit_batch_size_images_count") == 0  # nothing reached the model
    asyncio.run(main())


def test_api_key(model):
    async def main():
        app = create_app(model=model, settings=settings(api_keys=("secret-key-1", "secret-key-2")))
        async with asgi_client(app) as c:
            body = {"labels": [1], **FAST}
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert (await c.post("/v1/generate", json=body, headers={"X-API-Key": "wrong-key-1"})).status_code == 401
            assert (await c.post("/v1/generate", json=body,
                                 headers={"Authorization": "Bearer secret-key-1"})).status_code == 200
            assert (await c.post("/v1/generate", json=body, headers={"X-API-Key": "secret-key-2"})).status_code == 200
            assert (await c.get("/v1/model")).status_code == 401
            for open_path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.json"):
                assert (await c.get(open_path)).status_code == 200, open_path
    asyncio.run(main())


# -------------------------------------------------------------------------------------------------
# Limits
# -------------------------------------------------------------------------------------------------
def test_token_bucket():
    now = [100.0]
    rl = RateLimiter(10, 5, clock=lambda: now[0], max_clients=3)
    assert [rl.acquire("a") for _ in range(5)] == [0.0] * 5  # the burst
    wait = rl.acquire("a")
    assert wait == pytest.approx(0.1)
    assert rl.acquire("b") == 0.0  # another client has its own bucket
    now[0] += 0.1  # one token back
    assert rl.acquire("a") == 0.0 and rl.acquire("a") > 0
    now[0] += 10  # long idle: full again, but never more than the burst
    assert [rl.acquire("a") for _ in range(6)].count(0.0) == 5
    for k in "cdef":
        rl.acquire(k)
    assert len(rl) <= 3  # bounded memory
    off = RateLimiter(0, 0)
    assert all(off.acquire("x") == 0.0 for _ in range(100))


def test_rate_limit_429_per_client(model):
    async def main():
        # 10 requests/s with bursts of 5, the tutorial's numbers; invalid bodies still spend tokens, so no
        # model work is needed. The 6th request inside one burst window is refused.
        app = create_app(model=model, settings=settings(rate_limit=10, burst=5))
        async with asgi_client(app, client_addr=("10.1.1.1", 1)) as a:
            b = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.1.2", 1)), base_url="http://t")
            a2 = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.1.1", 2)),
                                   base_url="http://t")  # the same address, another connection
            async with b, a2:
                codes = [(await a.post("/v1/generate", json={})).status_code for _ in range(6)]
                assert codes[:5] == [422] * 5 and codes[5] == 429, codes
                r = await a2.post("/v1/generate", json={})  # the address's bucket
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert (await b.post("/v1/generate", json={})).status_code == 422  # its own bucket
                assert (await a.get("/healthz")).status_code == 200  # probes are never limited
                await asyncio.sleep(0.25)  # two tokens back at 10/s
                assert (await b.post("/v1/generate", json={})).status_code == 422
                text = (await a.get("/metrics")).text
                assert metric(text, "ditkit_rejections_total", reason="rate_limited") == 2

        app = create_app(model=model, settings=settings(rate_limit=0))  # --rate-limit 0: off
        async with asgi_client(app) as c:
            if True:
                assert {(await c.post("/v1/generate", json={})).status_code for _ in range(30)} == {422}
    asyncio.run(main())


def test_queue_full_is_503_then_the_queue_drains(model):
    async def main():
        app = create_app(model=model, settings=settings(max_queue=4))
        svc = app.state.service
        async with asgi_client(app, client_addr=("127.0.0.1", 0)) as c:  # no port: no hold (see below)
            svc.batcher.pause()  # hold the worker: nothing leaves the queue
            queued = [asyncio.create_task(c.post("/v1/generate", json={"labels": [i], "seed": i, **FAST}))
                      for i in range(4)]
            await wait_for(lambda: svc.batcher.queue_depth == 4, what="4 queued requests")
            for _ in range(3):
                r = await c.post("/v1/generate", json={"labels": [9], **FAST})
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
                assert "busy" in r.json()["detail"]
            assert not any(t.done() for t in queued)
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_queue_depth") == 4
            assert metric(text, "ditkit_rejections_total", reason="queue_full") == 3
            svc.batcher.resume()
            results = await asyncio.gather(*queued)
            assert [r.status_code for r in results] == [200] * 4
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_batch_size_images_count") == 1  # the four ran as one batch
            assert metric(text, "ditkit_batch_size_images_sum") == 4
            assert metric(text, "ditkit_queue_depth") == 0
            assert (await c.post("/v1/generate", json={"labels": [9], **FAST})).status_code == 200
    asyncio.run(main())


def test_deadline_is_504_and_leaves_the_queue(model):
    async def main():
        app = create_app(model=model, settings=settings(timeout_s=0.3))
        svc = app.state.service
        async with asgi_client(app) as c:
            svc.batcher.pause()
            t0 = time.monotonic()
            r = await c.post("/v1/generate", json={"labels": [1], **FAST})
            assert r.status_code == 504 and 0.3 <= time.monotonic() - t0 < 5, r.text
            assert svc.batcher.queue_depth == 0
            svc.batcher.resume()
            assert (await c.post("/v1/generate", json={"labels": [1], **FAST})).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_rejections_total", reason="deadline") == 1
    asyncio.run(main())


def test_client_disconnect_cancels_the_work_then_the_server_recovers(model):
    async def main():
        app = create_app(model=model, settings=settings())
        svc = app.state.service
        async with live_server(app) as (_, _, url):
            port = int(url.rsplit(":", 1)[1])
            svc.batcher.pause()
            body = json.dumps({"labels": [2], "num_samples": 4, **FAST}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await wait_for(lambda: svc.batcher.queue_depth == 1, what="the request queued")
            writer.close()  # the client goes away
            await wait_for(lambda: svc.batcher.queue_depth == 0 and svc.inflight == 0, what="the work dropped")
            svc.batcher.resume()
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                r = await c.post("/v1/generate", json={"labels": [2], **FAST})
                assert r.status_code == 200
                text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_rejections_total", reason="client_disconnected") == 1
            assert metric(text, "ditkit_batch_size_images_sum") == 1  # the abandoned 4 images never ran

            # A client that leaves mid-batch: its batch (nobody else's) is aborted between two steps.
            seen = []
            original = svc.batcher.run_batch

            def slow(batch):
                seen.append(batch)
                return original(batch)
            svc.batcher.run_batch = slow
            body = json.dumps({"labels": [2], "num_samples": 16, "steps": 1000}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await wait_for(lambda: svc.batcher._busy, what="the batch running")
            t0 = time.monotonic()
            writer.close()
            await wait_for(lambda: svc.batcher.idle, what="the batch aborted")
            assert time.monotonic() - t0 < 10 and seen[-1].abandoned()
            svc.batcher.run_batch = original
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                assert (await c.post("/v1/generate", json={"labels": [2], **FAST})).status_code == 200
    asyncio.run(main())


def test_same_seed_same_image_under_concurrent_load(model):
    """Each request alone, then all at once (batched together, with mixed labels, guidance and seeds,
    plus duplicates): every request gets exactly its images back, byte for byte (docs/DESIGN.md contract 3;
    the layers keep CPU GEMMs batch-invariant)."""
    requests = [{"labels": [d % 10], "num_samples": 1 + d % 3, "seed": 1000 + d,
                 "guidance_scale": [1.0, 2.5, 4.0][d % 3], "autoguidance": [1.0, 2.0][d % 2 if d < 6 else 0],
                 "format": "json", **FAST} for d in range(8)]

    async def main():
        app = create_app(model=model, settings=settings(max_wait_ms=50))
        svc = app.state.service
        async with asgi_client(app) as c:
            alone = []
            for body in requests:
                r = await c.post("/v1/generate", json=body)
                alone.append(r.json())
            svc.batcher.pause()  # let every request arrive before the first batch
            tasks = [asyncio.create_task(c.post("/v1/generate", json=b)) for b in requests + requests]
            await wait_for(lambda: svc.batcher.queue_depth == len(tasks), what="all requests queued")
            svc.batcher.resume()
            together = [r.json() for r in await asyncio.gather(*tasks)]
            text = (await c.get("/metrics")).text
        assert metric(text, "ditkit_batch_size_images_count") == len(requests) + 1  # 8 alone + 1 batch of all
        for i, res in enumerate(together):
            ref = alone[i % len(requests)]
            assert res["seeds"] == ref["seeds"] and res["labels"] == ref["labels"]
            assert res["images"] == ref["images"], f"request {i}: batched images differ from its images alone"
    asyncio.run(main())


def test_autoguidance_needs_a_weak_model(model, tmp_path):
    """A run with a guide (the fixture's, kept at 25% of training) takes `autoguidance`; a model without
    one answers 422 naming the field, and /v1/model says which it is."""
    import dataclasses

    bare = dataclasses.replace(model, guide=None)

    async def main():
        for m, ok in ((model, True), (bare, False)):
            app = create_app(model=m, settings=settings())
            async with asgi_client(app) as c:
                assert (await c.get("/v1/model")).json()["autoguidance"] is ok
                r = await c.post("/v1/generate", json={"labels": [3], "autoguidance": 2.0, "format": "json", **FAST})
                if ok:
                    assert r.status_code == 200 and r.json()["autoguidance"] == 2.0
                else:
                    assert r.status_code == 422 and ["body", "autoguidance"] in [e["loc"] for e in r.json()["detail"]]
    asyncio.run(main())


def test_guidance_interval_is_a_server_setting(model):
    """`ditkit serve --guidance-interval LO,HI`: every request is guided only at sigma in [LO, HI], as the
    library's sample_batch does with the same interval; /v1/model says so; bad values are refused up front."""
    band = (0.6, float("inf"))

    async def main():
        app = create_app(model=model, settings=settings(guidance_interval=band))
        async with asgi_client(app) as c:
            assert (await c.get("/v1/model")).json()["guidance_interval"] == [0.6, None]
            r = await c.post("/v1/generate", json={"labels": [2, 5], "seed": 4, "guidance_scale": 3.0,
                                                   "autoguidance": 2.0, "format": "json", **FAST})
            assert r.status_code == 200, r.text
            got = np.stack([png_pixels(base64.b64decode(s)) for s in r.json()["images"]])
        guided = SamplingSettings(steps=3, cfg_scale=3.0, autoguidance=2.0, guidance_interval=band)
        x = sample_batch(model, [2, 5], image_seeds(4, 2), guided)
        np.testing.assert_array_equal(got, to_uint8(x)[..., 0])
        y = sample_batch(model, [2, 5], image_seeds(4, 2), guided.replace(guidance_interval=None))
        assert not np.array_equal(got, to_uint8(y)[..., 0])  # the interval changed the images
    asyncio.run(main())
    for bad in [(2.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (1.0,)]:
        with pytest.raises(UsageError, match="--guidance-interval"):
            settings(guidance_interval=bad).validate()


def test_batcher_groups_by_sampler_and_steps_and_splits_large_requests():
    """The batching rules on a stand-in model: image b's value encodes (label, seed, scale)."""
    ran: list[Batch] = []

    def run(batch: Batch) -> np.ndarray:
        ran.append(batch)
        return np.array([[[[lab, seed % 251, int(s * 10)]]] for lab, seed, s in
                         zip(batch.labels, batch.seeds, batch.settings.cfg_scale)], dtype=np.uint8)

    def job(label, n, sampler="euler", steps=3, scale=1.0, seed=0):
        return Job([label] * n, [seed + i for i in range(n)], SamplingSettings(sampler=sampler, steps=steps,
                                                                               cfg_scale=scale))

    async def main():
        b = Batcher(run, max_batch_size=4, max_wait_ms=200, max_queue=10)
        b.start()
        b.pause()
        jobs = [job(1, 2), job(2, 1, sampler="heun"), job(3, 3, scale=2.0, seed=10), job(4, 1, steps=5),
                job(5, 1, sampler="heun")]
        futs = [b.submit(j) for j in jobs]
        with pytest.raises(QueueFull):
            for _ in range(10):
                b.submit(job(9, 1))
        for j in list(b._queue)[len(jobs):]:
            b.cancel(j)
        assert b.queue_depth == len(jobs)
        b.resume()
        out = await asyncio.wait_for(asyncio.gather(*futs), 10)
        await b.stop()
        keys = [(x.settings.sampler, x.settings.steps, len(x)) for x in ran]
        # oldest first; same (sampler, steps) together; the 3-image request split 2 + 1 across batches
        assert keys == [("euler", 3, 4), ("heun", 3, 2), ("euler", 3, 1), ("euler", 5, 1)], keys
        assert ran[0].labels == [1, 1, 3, 3] and ran[2].labels == [3]
        assert ran[0].settings.cfg_scale == (1.0, 1.0, 2.0, 2.0)  # one scale per image in the batch's settings
        np.testing.assert_array_equal(out[2][:, 0, 0], [[3, 10, 20], [3, 11, 20], [3, 12, 20]])
        assert all(len(o) == j.n for o, j in zip(out, jobs))

    asyncio.run(main())
    # a batch shares everything in the settings but the per-image guidance scales
    assert job(1, 1, scale=1.0).key == job(2, 2, scale=3.0).key
    spaced = Job([1], [0], SamplingSettings(sampler="euler", steps=3, spacing="karras"))
    assert job(1, 1).key != spaced.key
    with pytest.raises(ValueError, match="one cfg_scale per image"):
        Job([1, 2], [0, 1], SamplingSettings(cfg_scale=(1.0, 2.0, 3.0)))


def test_batch_waits_for_the_clients_the_last_batch_answered():
    """The wait for companions counts from the end of the previous batch, not only from the oldest
    request's arrival: requests that queued up during a long batch wait for the clients that batch just
    answered, so that a closed loop of clients does not split into two cohorts taking turns."""
    ran: list[Batch] = []
    release = threading.Event()

    def run(batch: Batch) -> np.ndarray:
        ran.append(batch)
        if len(ran) == 1:
            release.wait(10)
        return np.zeros((len(batch), 1, 1, 1), dtype=np.uint8)

    def job(label, n=1):
        return Job([label] * n, list(range(n)), SamplingSettings(sampler="euler", steps=3))

    async def main():
        b = Batcher(run, max_batch_size=4, max_wait_ms=300, max_queue=10)
        b.start()
        first = b.submit(job(1, 4))  # a full batch: runs at once, and holds the worker
        await asyncio.sleep(0.05)
        waiting = b.submit(job(2))
        await asyncio.sleep(0.4)  # longer than max_wait: by arrival alone, it would start the moment the worker frees
        release.set()
        await asyncio.wait_for(first, 10)
        await asyncio.sleep(0.05)  # the answered client comes back
        back = b.submit(job(3))
        await asyncio.wait_for(asyncio.gather(waiting, back), 10)
        await b.stop()
        assert [x.labels for x in ran] == [[1, 1, 1, 1], [2, 3]], [x.labels for x in ran]

    asyncio.run(main())


def test_max_batch_size_one_turns_batching_off(model):
    async def main():
        app = create_app(model=model, settings=settings(max_batch_size=1))
        svc = app.state.service
        async with asgi_client(app) as c:
            svc.batcher.pause()
            tasks = [asyncio.create_task(c.post("/v1/generate", json={"labels": [i], "num_samples": 2, "seed": i,
                                                                      "format": "json", **FAST})) for i in range(2)]
            await wait_for(lambda: svc.batcher.queue_depth == 2, what="queued")
            svc.batcher.resume()
            res = [r.json() for r in await asyncio.gather(*tasks)]
            text = (await c.get("/metrics")).text
        assert metric(text, "ditkit_batch_size_images_count") == 4 and metric(text, "ditkit_batch_size_images_sum") == 4
        ref = library_images(model, [1, 1], 1, 1.0, steps=3)  # the library's one batch of two
        got = np.stack([png_pixels(base64.b64decode(s)) for s in res[1]["images"]])
        np.testing.assert_array_equal(got, ref)  # split into two batches of one: the same images
    asyncio.run(main())


# -------------------------------------------------------------------------------------------------
# Lifecycle
# -------------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_work(model):
    async def main():
        app = create_app(model=model, settings=settings(grace_s=20))
        svc = app.state.service
        async with live_server(app) as (server, task, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                svc.batcher.pause()
                in_flight = asyncio.create_task(c.post("/v1/generate", json={"labels": [5], **FAST}))
                await wait_for(lambda: svc.batcher.queue_depth == 1, what="the request queued")
                assert signal.getsignal(signal.SIGTERM) == server.handle_exit  # never kill the test run
                os.kill(os.getpid(), signal.SIGTERM)
                await wait_for(lambda: svc.state == "draining", what="draining")
                r = await c.get("/readyz")
                assert r.status_code == 503 and r.json()["status"] == "draining"
                assert (await c.get("/healthz")).status_code == 200
                r = await c.post("/v1/generate", json={"labels": [5], **FAST})
                assert r.status_code == 503 and "retry-after" in r.headers
                assert not task.done()  # still serving while the admitted request waits
                svc.batcher.resume()
                assert (await in_flight).status_code == 200
            await asyncio.wait_for(task, 15)  # then the server exits by itself
        assert svc.state == "stopped"
    asyncio.run(main())


def test_app_loads_a_checkpoint_itself(tiny_run):
    async def main():
        app = create_app(ckpt=tiny_run, settings=settings())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                await wait_for(lambda: app.state.service.state != "loading", what="loading")
                assert (await c.get("/readyz")).status_code == 200
                assert (await c.post("/v1/generate", json={"prompt": "two", **FAST})).status_code == 200
        bad = create_app(ckpt="/nonexistent/run", settings=settings())
        async with bad.router.lifespan_context(bad):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bad), base_url="http://t") as c:
                await wait_for(lambda: bad.state.service.state != "loading", what="loading")
                r = await c.get("/readyz")
                assert r.status_code == 503 and r.json()["status"] == "failed"
                assert (await c.get("/healthz")).status_code == 200
                assert (await c.post("/v1/generate", json={"prompt": "two"})).status_code == 503
        half = create_app(ckpt=tiny_run, settings=settings(precision="bf16"))  # --precision bf16
        async with half.router.lifespan_context(half):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=half), base_url="http://t") as c:
                await wait_for(lambda: half.state.service.state != "loading", what="loading")
                assert (await c.get("/v1/model")).json()["precision"] == "bf16"
                r = await c.post("/v1/generate", json={"labels": [3, 8], "num_samples": 2, "seed": 4,
                                                       "guidance_scale": 2.0, "format": "json", **FAST})
                assert r.status_code == 200, r.text
                got = np.stack([png_pixels(base64.b64decode(s)) for s in r.json()["images"]])
                np.testing.assert_array_equal(got, library_images(half.state.service.model, [3, 8], 4, 2.0, steps=3))
    asyncio.run(main())
    with pytest.raises(UsageError, match="allowed values are auto, fp32, bf16"):
        settings(precision="fp16").validate()
    # auto (the default): bf16 where the hardware runs it natively and batching is on, fp32 otherwise
    native = native_bf16(torch.device("cpu"))
    assert ServeSettings().precision == "auto"
    assert settings(precision="auto", max_batch_size=8, device="cpu").resolved_precision() == ("bf16" if native else "fp32")
    assert settings(precision="auto", max_batch_size=1, device="cpu").resolved_precision() == "fp32"
    assert settings(precision="fp32", max_batch_size=8).resolved_precision() == "fp32"


def test_model_loads_on_the_thread_that_runs_its_batches(tiny_run, monkeypatch):
    """All torch work of a server on one thread: loading, warm-up and every batch (one OpenMP team;
    see batcher.model_thread)."""
    import threading

    import ditkit.serve.app as app_module

    threads: dict[str, set] = {"load": set(), "batch": set()}
    real_load, real_run = app_module.load_model, app_module.Service._run_batch

    def load(*a, **k):
        threads["load"].add(threading.get_ident())
        return real_load(*a, **k)

    def run(self, batch):
        threads["batch"].add(threading.get_ident())
        return real_run(self, batch)

    monkeypatch.setattr(app_module, "load_model", load)
    monkeypatch.setattr(app_module.Service, "_run_batch", run)

    async def main():
        app = create_app(ckpt=tiny_run, settings=settings())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                await wait_for(lambda: app.state.service.state != "loading", what="loading")
                for label in (1, 2):
                    assert (await c.post("/v1/generate", json={"labels": [label], **FAST})).status_code == 200
    asyncio.run(main())
    assert len(threads["load"]) == 1 and threads["batch"] == threads["load"], threads
    assert threading.get_ident() not in threads["load"]


def test_cli_serve_runs_and_exits_cleanly_on_sigterm(tiny_run, tmp_path):
    from ditkit.cli import main as cli_main

    assert cli_main(["serve", "--ckpt", str(tmp_path / "missing")]) in (1, 2)
    with pytest.raises(SystemExit):
        cli_main(["serve", "--ckpt", str(tiny_run), "--rate-limit", "-1"])

    sock = free_socket()  # a port that is free now; the child binds it after we let go
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONUNBUFFERED="1", DITKIT_API_KEYS="env-key-123")
    proc = subprocess.Popen([sys.executable, "-m", "ditkit", "serve", "--ckpt", str(tiny_run), "--port", str(port),
                             "--threads", "1", "--grace-s", "10", "--no-access-log", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/generate", json={"prompt": "one", **FAST}, headers={"X-API-Key": "env-key-123"},
                       timeout=30)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        assert httpx.post(url + "/v1/generate", json={"prompt": "one"}, timeout=30).status_code == 401
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------------------------------------
# The playground page, in a real browser
# -------------------------------------------------------------------------------------------------
class _CDP:
    """Just enough of the Chrome DevTools Protocol: commands by id, events ignored."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]


def test_playground_page_in_headless_chromium(model, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium')")
    websockets = pytest.importorskip("websockets")
    app = create_app(model=model, settings=settings(rate_limit=10, burst=5))
    with server_thread(app) as url:
        html = httpx.get(url + "/").text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must load nothing remote"
        assert "default-src 'none'" in httpx.get(url + "/").headers["content-security-policy"]

        profile = tmp_path / "chromium"
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = profile / "DevToolsActivePort"
            end = time.monotonic() + 60
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                assert time.monotonic() < end and proc.poll() is None, "chromium did not start"
                time.sleep(0.1)
            port, path = port_file.read_text().split()[:2]

            async def drive() -> dict:
                async with websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=2**24) as ws:
                    cdp = _CDP(ws)
                    target = await cdp.call("Target.createTarget",
                                            url=f"{url}/?auto=1&label=7&n=2&steps=3&guidance=3&seed=42")
                    session = (await cdp.call("Target.attachToTarget", targetId=target["targetId"],
                                              flatten=True))["sessionId"]
                    probe = ("JSON.stringify({state: document.getElementById('status')?.dataset.state || '',"
                             " text: document.getElementById('status')?.textContent || '',"
                             " imgs: [...document.querySelectorAll('img.result')].map(i => ({src: i.src,"
                             " w: i.naturalWidth, h: i.naturalHeight}))})")
                    end = time.monotonic() + 60
                    while time.monotonic() < end:
                        res = await cdp.call("Runtime.evaluate", session, expression=probe, returnByValue=True)
                        page = json.loads(res["result"].get("value") or "{}")
                        if page.get("state") in ("done", "error") and (page["imgs"] or page["state"] == "error"):
                            if all(i["w"] for i in page["imgs"]):
                                return page
                        await asyncio.sleep(0.2)
                    raise AssertionError(f"the page produced no image: {page}")

            page = asyncio.run(drive())
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # chromium and its helpers: the session we started
            proc.wait()
    assert page["state"] == "done", page["text"]
    assert len(page["imgs"]) == 2 and "seed 42" in page["text"]
    for img in page["imgs"]:
        assert img["src"].startswith("data:image/png;base64,") and (img["w"], img["h"]) == (28, 28)
        pixels = png_pixels(base64.b64decode(img["src"].split(",", 1)[1]))
        assert pixels.shape == (28, 28) and pixels.std() > 0
    ref = library_images(model, [7, 7], 42, 3.0, steps=3)
    got = png_pixels(base64.b64decode(page["imgs"][0]["src"].split(",", 1)[1]))
    np.testing.assert_array_equal(got, ref[0])


# -------------------------------------------------------------------------------------------------
# Property-based fuzzing of the OpenAPI schema
# -------------------------------------------------------------------------------------------------
def test_openapi_fuzz_no_server_errors(model):
    """schemathesis draws valid and invalid requests for every operation from /openapi.json; none may get
    a 5xx, every status code and body must be the documented ones, and invalid data must be refused."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)

    app = create_app(model=model, settings=settings(max_steps=3, max_num_samples=4, rate_limit=0))
    with server_thread(app) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        ops = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in ops} >= {"/v1/generate", "/v1/model", "/healthz", "/readyz", "/metrics"}
        strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in ops
                              for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
        statuses: dict[str, dict[int, int]] = {}
        checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                  response_schema_conformance, negative_data_rejection]

        @hsettings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case):
            response = case.call(base_url=url, timeout=30)
            seen = statuses.setdefault(f"{case.method} {case.path}", {})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=checks)

        fuzz()
    assert not any(code >= 500 for seen in statuses.values() for code in seen), statuses
    generate = statuses["POST /v1/generate"]
    assert generate.get(200, 0) >= 10 and generate.get(422, 0) >= 10, statuses


# -------------------------------------------------------------------------------------------------
# Hostile clients: bodies, headers, addresses, keys, storms (issue 51)
# -------------------------------------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"labels": ' + b"[" * depth + b"]" * depth + b"}"


# (raw body, a `loc` the 422 must name)
HOSTILE_BODIES = [
    (b'{"prompt": "\\u00b2"}', ["body", "prompt"]),  # superscript two: isdigit() but not int()
    (b'{"prompt": "\\u2460"}', ["body", "prompt"]),  # circled one
    ('{"prompt": "①"}'.encode(), ["body", "prompt"]),
    (b'{"prompt": "\\ud800"}', ["body", "prompt"]),  # a lone surrogate, echoed back as `input`
    (b'{"labels": [1], "sampler": "\\udfff"}', ["body", "sampler"]),
    (b'{"labels": [1], "\\ud800": 1}', ["body"]),  # a key pydantic cannot read as a string
    (b'{"labels": [1], "colo\\u00fcr\\ud800x": 1}', ["body"]),
    (b'{"labels": [1], "format": "\\ud800\\udc00\\ud800"}', ["body", "format"]),
    (nested(500), ["body"]),
    (nested(950), ["body"]),
    (nested(30_000), ["body"]),  # past json's own recursion limit
    (nested(65), ["body"]),
    (b'{"labels": [1], "labels": [2]}', ["body", "labels"]),  # a duplicate key: not "last one wins"
    (b'{"labels": [1], "seed": 1, "steps": 3, "seed": 2}', ["body", "seed"]),
    (b'{"labels": [1], "x": {"a": 1, "a": 2}}', ["body", "a"]),
    (b"\xff\xfe\x00", ["body"]),  # not UTF-8/16/32
    (b"", ["body"]),
]


def test_hostile_bodies_are_422_never_500(model):
    async def main():
        app = create_app(model=model, settings=settings())
        async with asgi_client(app) as c:
            for raw, loc in HOSTILE_BODIES:
                r = await c.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 422, (raw[:60], r.status_code, r.text[:300])
                detail = json.loads(r.content.decode("utf-8"))["detail"]  # valid UTF-8 JSON
                assert loc in [e["loc"] for e in detail], (raw[:60], detail)
            r = await c.post("/v1/generate", content=b'{"labels": [1], "labels": [2]}',
                             headers={"content-type": "application/json"})
            assert "'labels' is given twice" in r.json()["detail"][0]["msg"]
            r = await c.post("/v1/generate", content=nested(500), headers={"content-type": "application/json"})
            assert "deeper than 64" in r.json()["detail"][0]["msg"]
            r = await c.post("/v1/generate", content=b'{"labels": [1]}', headers={"content-type": "text/plain"})
            assert r.status_code == 422 and "must be JSON" in r.json()["detail"][0]["msg"]
            # the body is still read as JSON without a Content-Type, and with a +json one
            for ctype in ({}, {"content-type": "application/vnd.api+json; charset=utf-8"}):
                r = await c.post("/v1/generate", content=b'{"labels": [1], "steps": 2}', headers=ctype)
                assert r.status_code == 200, (ctype, r.text)
            text = (await c.get("/metrics")).text
            assert not any(metric(text, "ditkit_http_requests_total", route="/v1/generate", method="POST",
                                  code=str(code)) for code in range(500, 600))
            spec = (await c.get("/openapi.json")).json()  # the schema still documents the body
            op = spec["paths"]["/v1/generate"]["post"]
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
            assert "422" in op["responses"]
    asyncio.run(main())


def test_forwarded_for_is_trusted_only_from_named_proxies(model):
    """By default X-Forwarded-For is ignored (uvicorn would trust it from 127.0.0.1): varying it from one
    address cannot buy a fresh rate-limit bucket per request. `--forwarded-allow-ips` names the proxies."""
    async def main(allow: tuple[str, ...]) -> tuple[list[int], float]:
        app = create_app(model=model, settings=settings(rate_limit=1, burst=5, forwarded_allow_ips=allow))
        async with live_server(app) as (_, _, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                t0 = time.monotonic()
                codes = [(await c.post("/v1/generate", json={}, headers={"X-Forwarded-For": f"10.9.{i}.1"})).status_code
                         for i in range(40)]
                return codes, time.monotonic() - t0

    codes, seconds = asyncio.run(main(()))
    # one bucket for all 40: the burst of 5, plus a token a second
    assert codes.count(422) <= 5 + math.ceil(seconds) and codes.count(429) >= 40 - 5 - math.ceil(seconds), codes
    codes, _ = asyncio.run(main(("127.0.0.1",)))  # behind a proxy on loopback: each forwarded client its own bucket
    assert codes == [422] * 40, codes
    assert settings(forwarded_allow_ips="10.0.0.1, 10.1.0.0/16").validate() is None
    with pytest.raises(UsageError, match="--forwarded-allow-ips 'proxy.local'"):
        settings(forwarded_allow_ips=("proxy.local",)).validate()


def test_client_leaving_before_its_body_is_no_500(model):
    async def main():
        app = create_app(model=model, settings=settings())
        async with live_server(app) as (_, _, url):
            port = int(url.rsplit(":", 1)[1])
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"labels\"")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.close()
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                end = time.monotonic() + 10
                while True:
                    text = (await c.get("/metrics")).text
                    left = metric(text, "ditkit_http_requests_total", route="/v1/generate", method="POST", code="499")
                    if left == 3 or time.monotonic() > end:
                        break
                    await asyncio.sleep(0.05)
        assert left == 3
        assert metric(text, "ditkit_http_requests_total", route="/v1/generate", method="POST", code="500") == 0
        assert metric(text, "ditkit_rejections_total", reason="client_disconnected") == 3
    asyncio.run(main())


def test_request_head_size_is_capped(model):
    async def main():
        app = create_app(model=model, settings=settings(max_header_bytes=8192))
        async with live_server(app) as (_, _, url):
            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            sent = 0

            async def send_16_mb_header() -> None:
                nonlocal sent
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(256):
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536

            sender = asyncio.get_running_loop().create_task(send_16_mb_header())
            answer = await asyncio.wait_for(reader.readline(), 10)  # the answer comes while the header is sent
            sender.cancel()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 431"), answer
            assert sent < 16 * 2**20
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:  # a head under the cap is served
                r = await c.get("/healthz", headers={"X-Fine": "b" * 6000})
                assert r.status_code == 200
                r = await c.post("/v1/generate", json={"labels": [1], "steps": 2}, headers={"X-Fine": "b" * 6000})
                assert r.status_code == 200
    asyncio.run(main())
    assert ServeSettings().max_header_bytes == 64 * 1024
    with pytest.raises(UsageError, match="--max-header-bytes"):
        settings(max_header_bytes=10).validate()


def test_failed_api_keys_are_throttled_per_address(model):
    from ditkit.serve.limits import FailedAuthThrottle

    now = [0.0]
    t = FailedAuthThrottle(5, 60.0, clock=lambda: now[0], max_clients=2)
    for _ in range(5):
        assert t.blocked_for("a") == 0.0
        t.failed("a")
        now[0] += 1
    assert t.blocked_for("a") == pytest.approx(55.0) and t.blocked_for("b") == 0.0
    now[0] += 55.0
    assert t.blocked_for("a") == 0.0  # the oldest failure left the window
    for k in "xyz":
        t.failed(k)
    assert len(t._failures) <= 2  # bounded memory

    async def main():
        app = create_app(model=model, settings=settings(api_keys=("secret-key-1",)))
        async with asgi_client(app, client_addr=("10.2.2.2", 1)) as a:
            other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.2.2.3", 1)),
                                      base_url="http://t")
            async with other:
                codes = [(await a.post("/v1/generate", json={}, headers={"X-API-Key": f"guess-{i:04d}"})).status_code
                         for i in range(5)]
                assert codes == [401] * 5
                r = await a.post("/v1/generate", json={}, headers={"X-API-Key": "secret-key-1"})
                assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60, r.text
                r = await other.post("/v1/generate", json={}, headers={"X-API-Key": "secret-key-1"})
                assert r.status_code == 422  # another address: not throttled
                text = (await a.get("/metrics")).text
                assert metric(text, "ditkit_rejections_total", reason="auth_throttled") == 1
                assert metric(text, "ditkit_rejections_total", reason="unauthorized") == 5
    asyncio.run(main())


def captured_access_log(caplog) -> logging.Logger:
    """The access logger, its lines going to caplog only (once each)."""
    access = logging.getLogger("ditkit.serve.access")
    access.addHandler(caplog.handler)
    access.propagate = False
    access.setLevel(logging.INFO)
    return access


def test_request_ids_and_one_json_log_line_per_request(model, caplog):
    access = captured_access_log(caplog)

    async def main():
        app = create_app(model=model, settings=settings(max_queue=1, rate_limit=100, burst=100))
        svc = app.state.service
        async with asgi_client(app) as c:
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 7, "format": "json", **FAST},
                             headers={"X-Request-ID": "trace-abc/1 ok"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "trace-abc/1 ok"
            for bad in ("x" * 129, "tab\there", "caf\u00e9"):
                r = await c.get("/healthz", headers={"X-Request-ID": bad.encode("utf-8")})
                assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers["x-request-id"]
            ids = set()
            for path, kw in (("/no/such", {}), ("/v1/model", {})):
                ids.add((await c.get(path, **kw)).headers["x-request-id"])
            r = await c.post("/v1/generate", json={"labels": [99]})
            assert r.status_code == 422 and "x-request-id" in r.headers
            svc.batcher.pause()
            held = asyncio.create_task(c.post("/v1/generate", json={"labels": [1], **FAST}))
            await wait_for(lambda: svc.batcher.queue_depth == 1, what="queued")
            r = await c.post("/v1/generate", json={"labels": [1], **FAST})
            assert r.status_code == 503 and "x-request-id" in r.headers
            svc.batcher.resume()
            assert (await held).status_code == 200
            assert len(ids) == 2

    try:
        asyncio.run(main())
    finally:
        access.removeHandler(caplog.handler)
        access.propagate = True
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "ditkit.serve.access"]
    ok = next(x for x in lines if x["request_id"] == "trace-abc/1 ok")
    assert ok["path"] == "/v1/generate" and ok["status"] == 200 and ok["seed"] == 7 and ok["images"] == 1
    assert ok["batch_sizes"] == [1] and ok["queue_ms"] >= 0 and ok["latency_ms"] >= ok["queue_ms"]
    assert ok["client"] == "127.0.0.1"
    assert sorted(x["status"] for x in lines if x["path"] == "/v1/generate") == [200, 200, 422, 503]
    assert len(lines) == 9  # one per request (probes included)


def test_refusals_are_cheap_before_the_body_and_not_a_log_storm(model, caplog):
    """With the queue full, a generate request is refused before its body is read or validated (an
    unparsable body gets the 503 too), and a burst of refusals logs a few lines a second, not one each."""
    access = captured_access_log(caplog)

    async def main():
        app = create_app(model=model, settings=settings(max_queue=1))
        svc = app.state.service
        async with asgi_client(app, client_addr=("127.0.0.1", 0)) as c:  # no port: no hold (see below)
            svc.batcher.pause()
            held = asyncio.create_task(c.post("/v1/generate", json={"labels": [1], **FAST}))
            await wait_for(lambda: svc.batcher.queue_depth == 1, what="queued")
            r = await c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 503 and "busy" in r.json()["detail"], r.text
            for _ in range(200):
                assert (await c.post("/v1/generate", json={"labels": [2]})).status_code == 503
            svc.batcher.resume()
            assert (await held).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_rejections_total", reason="queue_full") == 201
            assert metric(text, "ditkit_rejections_total", reason="invalid") == 0

    try:
        asyncio.run(main())
    finally:
        access.removeHandler(caplog.handler)
        access.propagate = True
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "ditkit.serve.access"]
    refused = [x for x in lines if x["status"] == 503]
    assert len(refused) < 60, len(refused)  # 10 a second at most, plus the budget's first 10
    assert sum(1 + x.get("refusals_not_logged", 0) for x in refused) <= 201


def test_a_connection_ignoring_retry_after_is_held_until_then(model):
    """A connection that comes back before the Retry-After of its last 503 has the next answer held until
    then, and is looked at again: refused if the queue is still full, admitted if there is room now.
    Another connection, or the same one after waiting, is answered at once."""
    async def main():
        app = create_app(model=model, settings=settings(max_queue=1))
        svc = app.state.service
        async with asgi_client(app, client_addr=("127.0.0.1", 5000)) as c:
            other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 5001)),
                                      base_url="http://t")
            svc.batcher.pause()
            queued = asyncio.create_task(other.post("/v1/generate", json={"labels": [1], **FAST}))
            await wait_for(lambda: svc.batcher.queue_depth == 1, what="queued")
            body = {"labels": [2], **FAST}
            t0 = time.monotonic()
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 503 and time.monotonic() - t0 < 0.9
            retry_s = int(r.headers["retry-after"])
            t0 = time.monotonic()
            r = await c.post("/v1/generate", json=body)  # at once: held, then refused again
            assert r.status_code == 503 and time.monotonic() - t0 >= retry_s - 0.05
            t0 = time.monotonic()
            assert (await other.post("/v1/generate", json=body)).status_code == 503  # answered at once
            assert time.monotonic() - t0 < 0.9
            again = asyncio.create_task(c.post("/v1/generate", json=body))  # at once again ...
            await asyncio.sleep(0.2)
            svc.batcher.resume()  # ... and the queue drains meanwhile: admitted after its hold
            assert (await again).status_code == 200 and (await queued).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "ditkit_rejections_total", reason="queue_full") == 3
            await other.aclose()
    asyncio.run(main())


def test_fuzz_generate_bodies_never_5xx(model):
    """hypothesis draws hostile bodies for POST /v1/generate: JSON values of every shape (non-finite
    numbers, lone surrogates, Unicode digits), requests with wrong field values, duplicate keys, deep
    nesting, cut-off JSON and raw bytes. None may get a 5xx, and every answer that says JSON is JSON."""
    from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

    tricky = st.sampled_from(["\u00b2", "\u2460", "\u0667", "\ud800", "\udfff\ud800", "7", "seven", "", " " * 101,
                              "euler", "dpm++2m", "png", "json", "\x00", "9" * 30])
    text = st.one_of(tricky, st.text(st.characters(exclude_categories=()), max_size=12))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), text)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=12)
    fields = ["labels", "prompt", "num_samples", "sampler", "steps", "guidance_scale", "autoguidance", "seed", "format"]
    field_values = {"labels": st.one_of(st.lists(st.integers(-2, 12), max_size=4), values), "prompt": text,
                    "num_samples": st.one_of(st.integers(-1, 5), values), "sampler": text,
                    "steps": st.one_of(st.integers(-1, 4), st.floats(), values),
                    "guidance_scale": st.one_of(st.floats(), values), "autoguidance": st.one_of(st.floats(), values),
                    "seed": st.one_of(st.integers(-2, 2**64), values), "format": text}
    requests = st.fixed_dictionaries({}, optional={**field_values, "colour": values})

    def encode(v) -> bytes:
        return json.dumps(v, allow_nan=True).encode()  # ensure_ascii: lone surrogates become \ud800 escapes

    pairs = st.lists(st.tuples(st.sampled_from(fields), scalars), min_size=2, max_size=5)
    bodies = st.one_of(
        requests.map(encode), values.map(encode),
        pairs.map(lambda ps: ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in ps) + "}").encode()),
        st.tuples(requests, st.floats(0, 1)).map(lambda t: encode(t[0])[:int(len(encode(t[0])) * t[1])]),
        st.integers(1, 3000).map(nested), st.binary(max_size=64))
    content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None])

    app = create_app(model=model, settings=settings(max_steps=2, max_num_samples=2))
    loop = asyncio.new_event_loop()
    statuses: dict[int, int] = {}
    ctx = app.router.lifespan_context(app)
    loop.run_until_complete(ctx.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 1)), base_url="http://t",
                               timeout=60)
    try:
        loop.run_until_complete(wait_for(lambda: app.state.service.state == "ready", what="readiness"))

        @hsettings(max_examples=400, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(body=bodies, content_type=content_types)
        @example(body=b'{"labels": [1, 2], "steps": 1, "format": "json"}', content_type=None)  # a valid one
        @example(body=b'{"prompt": "\\u00b2"}', content_type="application/json")
        def fuzz(body: bytes, content_type: str | None) -> None:
            headers = {"content-type": content_type} if content_type else {}
            r = loop.run_until_complete(client.post("/v1/generate", content=body, headers=headers))
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body[:200], r.status_code, r.text[:300])
            if r.headers.get("content-type", "").startswith("application/json"):
                json.loads(r.content.decode("utf-8"))

        fuzz()
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(ctx.__aexit__(None, None, None))
        loop.close()
    assert statuses.get(422, 0) >= 100 and statuses.get(200, 0) >= 1, statuses  # 422s: the malformed bodies
    print(f"fuzzed bodies by status: {dict(sorted(statuses.items()))}")  # pytest -s shows it
