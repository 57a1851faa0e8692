"""Ray Serve (issue 7): the same FastAPI app on replicas behind Ray's proxy.

Without a cluster: the replica plan refuses what the machine cannot hold, `--ray` without Ray says how to
install it (exit 2), the proxy middleware turns a lost replica into a clean 503, and the health check
fails when the model fails. With a local Ray that the module starts and shuts down (2 CPUs, no
dashboard, HTTP on 127.0.0.1 only): two replicas serve the same endpoints and limits; killing one
replica's process under load leaves every in-flight request completed or answered 503, later requests
succeed, and Ray brings the replica back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from ditkit.errors import UsageError
from ditkit.serve import ServeSettings, create_app
from ditkit.serve import ray_app
from ditkit.serve.ray_app import ReplicaHealth, ReplicaLostMiddleware, ReplicaPlan, parse_autoscale

ROOT = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(ray_app.serve is None, reason="Ray Serve is not installed (pip install 'ditkit[ray]')")
API_KEY = "test-key-0123"
REQUEST = {"labels": [3, 7], "num_samples": 4, "steps": 20, "format": "json", "seed": 1}


# -----------------------------------------------------------------------------------------------
# Without a cluster
# -----------------------------------------------------------------------------------------------
def test_plan_refuses_what_the_machine_cannot_hold():
    with pytest.raises(UsageError, match=r"--replicas 3: 3 replicas need 3 CPUs \(1 each\); this machine has 2"):
        ReplicaPlan(replicas=3).validate(cpus=2, gpus=0)
    with pytest.raises(UsageError, match=r"--autoscale \.\.,4: 4 replicas need 4 CPUs"):
        ReplicaPlan(replicas=1, autoscale=(1, 4)).validate(cpus=2, gpus=0)
    with pytest.raises(UsageError, match="--gpus-per-replica 0.5: this machine has no GPU"):
        ReplicaPlan(replicas=1, gpus_per_replica=0.5).validate(cpus=2, gpus=0)
    with pytest.raises(UsageError, match="2 replicas need 4 GPUs; this machine has 3"):
        ReplicaPlan(replicas=2, gpus_per_replica=2).validate(cpus=8, gpus=3)
    with pytest.raises(UsageError, match=r"--gpus-per-replica 1.5: a fraction in \(0, 1\] or a whole number"):
        ReplicaPlan(replicas=1, gpus_per_replica=1.5).validate(cpus=8, gpus=4)
    with pytest.raises(UsageError, match="outside --autoscale 2,3"):
        ReplicaPlan(replicas=1, autoscale=(2, 3)).validate(cpus=8, gpus=0)
    for bad in ("4", "a,b", "3,1", "0,0", "1,2,3"):
        with pytest.raises(UsageError, match="--autoscale"):
            parse_autoscale(bad)
    assert parse_autoscale(" 0, 4") == (0, 4)

    s = ServeSettings(max_batch_size=16, max_queue=100, grace_s=7)
    fixed = ReplicaPlan(replicas=2, gpus_per_replica=0.5).validate(cpus=2, gpus=1).deployment_options(s)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert fixed["max_queued_requests"] == 100 and fixed["max_ongoing_requests"] == 32
    assert fixed["graceful_shutdown_timeout_s"] == 7
    auto = ReplicaPlan(replicas=1, autoscale=(1, 2)).validate(cpus=2, gpus=0).deployment_options(s)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                                          "target_ongoing_requests": ray_app.DEFAULT_TARGET_ONGOING}


def test_ray_missing_is_one_line_and_exit_code_2(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_app, "serve", None)
    with pytest.raises(UsageError, match=r"install it with pip install 'ditkit\[ray\]'"):
        ray_app.run_ray(str(tiny_run), ServeSettings())
    # the CLI, in a Python where `import ray` fails
    (tmp_path / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "ditkit", "serve", "--ckpt", str(tiny_run), "--ray", "--replicas", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("ditkit serve: error: Ray Serve is not installed: install it with "
                                                 "pip install 'ditkit[ray]'")


@needs_ray
def test_cli_refuses_more_replicas_or_gpus_than_the_machine_has(tiny_run, capsys):
    from ditkit.cli import main

    cpus = os.cpu_count() or 1
    cases = [(["--replicas", str(cpus + 1)], f"--replicas {cpus + 1}: {cpus + 1} replicas need {cpus + 1} CPUs"),
             (["--autoscale", f"1,{cpus + 2}"], f"--autoscale ..,{cpus + 2}: {cpus + 2} replicas need"),
             (["--autoscale", "2,1"], "--autoscale '2,1': need 0 <= MIN <= MAX")]
    if not torch.cuda.is_available():
        cases.append((["--gpus-per-replica", "1"], "--gpus-per-replica 1: this machine has no GPU"))
    for flags, message in cases:  # refused before Ray starts: quick, and nothing is left running
        assert main(["serve", "--ckpt", str(tiny_run), "--ray", *flags]) == 2, flags
        assert f"ditkit serve: error: {message}" in capsys.readouterr().err, flags
    assert main(["serve", "--ckpt", str(tiny_run), "--replicas", "2"]) == 2
    assert "--replicas, --gpus-per-replica and --autoscale need --ray" in capsys.readouterr().err
    import ray
    assert not ray.is_initialized()


@needs_ray
def test_the_cluster_config_file_is_valid_and_builds_the_app(tiny_run):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` checks first
    (entry,) = cfg["applications"]
    assert entry["import_path"] == "ditkit.serve.ray_app:build_app"
    app = ray_app.build_app(dict(entry["args"], ckpt=str(tiny_run)))  # binds; nothing runs without a cluster
    assert type(app).__name__ == "Application"
    with pytest.raises(UsageError, match="unknown serve settings: max_batch"):
        ray_app.build_app({"ckpt": str(tiny_run), "max_batch": 4})
    with pytest.raises(UsageError, match="args.ckpt"):
        ray_app.build_app({})
    # a guidance interval in the YAML, written as on the command line or as a list
    assert ray_app.settings_from_args({"guidance_interval": "0.6,inf"}).guidance_interval == (0.6, float("inf"))
    assert ray_app.settings_from_args({"guidance_interval": [0.6, 80]}).guidance_interval == (0.6, 80.0)
    with pytest.raises(UsageError, match="--guidance-interval"):
        ray_app.build_app({"ckpt": str(tiny_run), "guidance_interval": "1,0.5"})
    with pytest.raises(UsageError, match="--replicas 3: outside --autoscale 1,2"):
        ray_app.build_app({"ckpt": str(tiny_run), "replicas": 3, "autoscale": "1,2"})


def _asgi_call(app, path: str = "/v1/generate") -> tuple[int, dict, bytes]:
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    asyncio.run(ReplicaLostMiddleware(app)(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_a_lost_replica_is_a_clean_503_and_app_answers_pass_through():
    async def proxy_lost_the_replica(scope, receive, send):  # Ray's proxy after ActorDiedError: no response
        return None

    async def proxy_raised(scope, receive, send):
        raise RuntimeError("the actor died unexpectedly")

    async def app_500(scope, receive, send):  # the app's own answer (its model failed): never rewritten
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"detail":"the model failed"}'})

    for inner in (proxy_lost_the_replica, proxy_raised):
        status, headers, body = _asgi_call(inner)
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert json.loads(body) == {"detail": "the replica serving this request stopped before answering; retry"}
    assert _asgi_call(app_500)[:1] == (500,)
    assert [m.cls for m in ray_app.proxy_middlewares()] == [ReplicaLostMiddleware]


def test_health_check_fails_when_the_model_fails(tiny_run):
    from ditkit.sampling import load_model

    model = load_model(tiny_run, device="cpu")
    app = create_app(model=model, settings=ServeSettings(rate_limit=0, warmup=False))
    service = app.state.service
    health = ReplicaHealth(service, probe_idle_s=3600)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                while service.state != "ready":
                    await asyncio.sleep(0.01)
                assert (await c.post("/v1/generate", json={**REQUEST, "steps": 2})).status_code == 200
                await health.check()  # healthy: no probe needed
                forward = model.net.forward

                def broken(*a, **k):
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")

                model.net.forward = broken
                r = await c.post("/v1/generate", json={**REQUEST, "steps": 2})
                assert r.status_code == 500 and health.failures_since_success == 1
                with pytest.raises(RuntimeError, match="failed a probe batch .*illegal memory access"):
                    await health.check()  # Ray would now replace this replica
                model.net.forward = forward  # a transient failure: the next probe passes
                await health.check()
                assert health.failures_since_success == 0
                # the metrics still see every batch (the health observer passes calls on)
                text = (await c.get("/metrics")).text
                assert 'ditkit_rejections_total{reason="internal"} 1.0' in text
                service.state, service.detail = "failed", "model loading failed: boom"
                with pytest.raises(RuntimeError, match="model loading failed: boom"):
                    await health.check()
                service.state = "ready"

    asyncio.run(scenario())


# -----------------------------------------------------------------------------------------------
# A local Ray: two replicas
# -----------------------------------------------------------------------------------------------
def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def replica_pids() -> set[int]:
    """The pids of our replicas: Ray names the process `ray::ServeReplica:<app>:<deployment>`; only
    processes under this test's own local Ray count."""
    found = set()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(f"ray::ServeReplica:{ray_app.APP_NAME}:{ray_app.DEPLOYMENT_NAME}".encode()) \
                and _descends_from(int(d.name), os.getpid()):
            found.add(int(d.name))
    return found


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(ray_app.APP_NAME)
    if app is None:
        return 0
    return app.deployments[ray_app.DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def ray_url(tiny_run):
    if ray_app.serve is None:
        pytest.skip("Ray Serve is not installed (pip install 'ditkit[ray]')")
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds the replicas' processes through /proc")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    settings = ServeSettings(rate_limit=0, max_batch_size=16, timeout_s=30, grace_s=5, api_keys=(API_KEY,))
    plan = ReplicaPlan(replicas=2)
    old_callback = os.environ.get(ray_app.PROXY_CALLBACK_ENV)
    os.environ[ray_app.PROXY_CALLBACK_ENV] = ray_app.PROXY_CALLBACK  # the local Ray's proxy inherits it
    try:
        url = ray_app.start_ray(str(tiny_run), settings, plan, host="127.0.0.1", port=0, threads=1, quiet=True)
        yield url
    finally:
        ray_app.stop_ray()
        if old_callback is None:
            os.environ.pop(ray_app.PROXY_CALLBACK_ENV, None)
        else:
            os.environ[ray_app.PROXY_CALLBACK_ENV] = old_callback


def _post(client: httpx.Client, url: str, body: dict) -> httpx.Response:
    return client.post(url + "/v1/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"})


@needs_ray
def test_two_replicas_serve_the_same_endpoints_and_limits(ray_url):
    assert running_replicas() == 2 and len(replica_pids()) == 2
    with httpx.Client(timeout=60) as c:
        r = _post(c, ray_url, REQUEST)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["images"]) == 4 and out["labels"] == [3, 7, 3, 7] and out["seed"] == 1
        assert _post(c, ray_url, REQUEST).json()["images"] == out["images"]  # same seed, same images, any replica
        png = _post(c, ray_url, {**REQUEST, "format": "png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        for path in ("/healthz", "/readyz", "/v1/model", "/openapi.json", "/metrics", "/"):
            assert c.get(ray_url + path, headers=auth).status_code == 200, path
        assert c.get(ray_url + "/v1/model", headers=auth).json()["num_classes"] == 10
        assert c.post(ray_url + "/v1/generate", json=REQUEST).status_code == 401  # the API key, in each replica
        assert c.get(ray_url + "/healthz").status_code == 200  # probes need no key
        assert _post(c, ray_url, {**REQUEST, "steps": 0}).status_code == 422
        big = c.post(ray_url + "/v1/generate", content=b"x" * 100_000,
                     headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
        assert big.status_code == 413


@needs_ray
def test_killing_a_replica_under_load_gives_503_at_worst_and_ray_brings_it_back(ray_url):
    before = replica_pids()
    assert len(before) == 2
    results: list[tuple[float, object]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    r = _post(c, ray_url, REQUEST)
                    results.append((time.monotonic(), r))
                except httpx.HTTPError as e:  # a dropped connection or a hang: what must not happen
                    results.append((time.monotonic(), e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a client hung"

    errors = [r for _, r in results if not isinstance(r, httpx.Response)]
    assert not errors, errors[:3]
    codes = [r.status_code for _, r in results]
    assert set(codes) <= {200, 503}, [(r.status_code, r.text[:200]) for _, r in results if r.status_code not in (200, 503)]
    assert codes.count(200) >= 4
    for _, r in results:
        if r.status_code == 503:
            assert r.headers.get("retry-after") and "detail" in r.json()
    assert any(t > t_kill and r.status_code == 200 for t, r in results), "the live replica kept serving"

    # Ray replaces the dead replica (on a loaded 2-core machine its new replica took over 90 s to run)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = replica_pids()
        if running_replicas() == 2 and len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    now = replica_pids()
    assert running_replicas() == 2 and len(now) == 2 and victim not in now, (before, now)
    with httpx.Client(timeout=60) as c:  # later requests succeed
        assert [_post(c, ray_url, REQUEST).status_code for _ in range(4)] == [200] * 4
