"""Ray Serve: the same FastAPI app (`create_app`) on N replicas behind Ray's HTTP proxy.

    ditkit serve --ckpt RUN --ray --replicas 2                    # a local Ray on this machine
    ditkit serve --ckpt RUN --ray --autoscale 1,4                 # replicas follow the load
    RAY_ADDRESS=auto ditkit serve --ckpt RUN --ray --replicas 8 --gpus-per-replica 0.5   # a running cluster
    serve deploy deploy/ray-serve.yaml                            # the cluster way (docs/SCALING.md)

Each replica is one `create_app` app: the same routes (/v1/generate, /v1/model, /healthz, /readyz,
/metrics, /, /docs), the same validation, limits and dynamic batching, inside the replica. Ray adds:

- routing: requests go to the replica with fewer ongoing requests (power of two choices);
- back-pressure: beyond `max_ongoing_requests` per replica, requests wait at the proxy; beyond
  `max_queued_requests` (= --max-queue) Ray answers 503;
- health: `check_health` (every 5 s) fails when the model failed to load, or fails a probe batch after a
  failed batch or a long idle spell; Ray then replaces the replica;
- autoscaling on ongoing requests per replica (`target_ongoing_requests`);
- replica loss: a replica's process that dies takes its in-flight requests with it. Ray's proxy would
  answer those with a bare 500; `ReplicaLostMiddleware` (installed in the proxy through
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) turns them into 503 + Retry-After, the answer a client should
  retry. Ray starts a new replica; later requests go to the live ones meanwhile.

Limits that live in a replica (rate limit per client, --max-queue) apply per replica: with N replicas a
client may get up to N times --rate-limit. Ray is an optional extra: `pip install 'ditkit[ray]'`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

from ..errors import DitkitError, UsageError

log = logging.getLogger("ditkit.serve.ray")

RAY_MISSING = "Ray Serve is not installed: install it with pip install 'ditkit[ray]'"
APP_NAME = "ditkit"
DEPLOYMENT_NAME = "ditkit"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "ditkit.serve.ray_app:proxy_middlewares"
API_KEYS_ENV = "DITKIT_API_KEYS"
FORWARDED_ALLOW_IPS_ENV = "FORWARDED_ALLOW_IPS"  # uvicorn's; "" trusts no proxy
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"  # Ray's default: 5 s
PROXY_READY_S = 30.0

HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0
PROBE_IDLE_S = 30.0  # an idle replica proves its model works this often (one image, two steps)
DEFAULT_TARGET_ONGOING = 8  # autoscaling target: ongoing requests per replica (a few batches' worth)

try:  # an optional extra; everything below that needs Ray checks `serve is not None`
    from ray import serve
except ModuleNotFoundError as _e:  # pragma: no cover - depends on the environment
    if not (_e.name or "").startswith("ray"):
        raise
    serve = None


def require_ray() -> None:
    if serve is None:
        raise UsageError(RAY_MISSING)


# -----------------------------------------------------------------------------------------------
# The plan: replicas, resources, autoscaling (pure; checked before Ray starts)
# -----------------------------------------------------------------------------------------------
def parse_autoscale(text: str) -> tuple[int, int]:
    """--autoscale MIN,MAX -> (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--autoscale {text!r}: give MIN,MAX replicas, e.g. 1,4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise UsageError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    autoscale: Optional[tuple[int, int]] = None
    target_ongoing_requests: int = DEFAULT_TARGET_ONGOING

    @property
    def most_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    def validate(self, cpus: float, gpus: float, where: str = "this machine") -> "ReplicaPlan":
        """Refuse a plan the cluster cannot hold, naming the flag: Ray would otherwise wait forever for
        resources that never come."""
        if self.replicas < 1:
            raise UsageError(f"--replicas {self.replicas}: must be >= 1")
        if not (self.gpus_per_replica == 0 or 0 < self.gpus_per_replica <= 1 or
                float(self.gpus_per_replica).is_integer()):
            raise UsageError(f"--gpus-per-replica {self.gpus_per_replica:g}: a fraction in (0, 1] or a whole number")
        if self.gpus_per_replica < 0:
            raise UsageError(f"--gpus-per-replica {self.gpus_per_replica:g}: must be >= 0")
        if self.target_ongoing_requests < 1:
            raise UsageError(f"target_ongoing_requests {self.target_ongoing_requests}: must be >= 1")
        if self.autoscale:
            lo, hi = self.autoscale
            if not lo <= self.replicas <= hi:
                raise UsageError(f"--replicas {self.replicas}: outside --autoscale {lo},{hi} (the initial count)")
        n = self.most_replicas
        flag = f"--autoscale ..,{n}" if self.autoscale else f"--replicas {n}"
        need_cpus = n * self.cpus_per_replica
        if need_cpus > cpus + 1e-9:
            raise UsageError(f"{flag}: {n} replicas need {need_cpus:g} CPUs ({self.cpus_per_replica:g} each); "
                             f"{where} has {cpus:g}. Lower it, or add nodes (ray start --address ...)")
        if self.gpus_per_replica > 0:
            if gpus <= 0:
                raise UsageError(f"--gpus-per-replica {self.gpus_per_replica:g}: {where} has no GPU; "
                                 "leave the flag out to serve on CPUs")
            need_gpus = n * self.gpus_per_replica
            if need_gpus > gpus + 1e-9:
                raise UsageError(f"{flag} --gpus-per-replica {self.gpus_per_replica:g}: {n} replicas need "
                                 f"{need_gpus:g} GPUs; {where} has {gpus:g}")
        return self

    def deployment_options(self, settings: Any) -> dict[str, Any]:
        """Options for `serve.deployment(...).options(...)` from the plan and the ServeSettings."""
        opts: dict[str, Any] = dict(
            name=DEPLOYMENT_NAME,
            ray_actor_options={"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            # Requests a replica takes at once: enough to fill two batches (batching happens inside the
            # replica); the rest wait at the proxy, and past --max-queue Ray answers 503.
            max_ongoing_requests=max(2, min(settings.max_queue, 2 * settings.max_batch_size)),
            max_queued_requests=settings.max_queue,
            graceful_shutdown_timeout_s=settings.grace_s,
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        )
        if self.autoscale:
            lo, hi = self.autoscale
            opts["autoscaling_config"] = dict(min_replicas=lo, max_replicas=hi, initial_replicas=self.replicas,
                                              target_ongoing_requests=self.target_ongoing_requests)
        else:
            opts["num_replicas"] = self.replicas
        return opts


def local_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of this machine, what a local Ray would offer."""
    gpus = 0
    try:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA is no GPU
        gpus = 0
    return float(os.cpu_count() or 1), float(gpus)


# -----------------------------------------------------------------------------------------------
# Replica health
# -----------------------------------------------------------------------------------------------
class ReplicaHealth:
    """Ray's `check_health` for one app: raises when the replica should be replaced.

    It watches the batcher (as its metrics observer, passing every call on): after a failed model batch,
    or when no batch has run for PROBE_IDLE_S, it runs one probe batch (1 image, 2 steps) on the model's
    worker thread; a probe that fails or hangs makes the replica unhealthy."""

    def __init__(self, service: Any, probe_idle_s: float = PROBE_IDLE_S, probe_timeout_s: float = 20.0):
        self.service = service
        self.probe_idle_s = probe_idle_s
        self.probe_timeout_s = probe_timeout_s
        self.failures_since_success = 0
        self.last_ok = time.monotonic()
        self._inner = service.batcher.observer
        service.batcher.observer = self

    # BatchObserver, passed on to the app's metrics
    def queue_changed(self, jobs: int, images: int) -> None:
        self._inner.queue_changed(jobs, images)

    def batch_started(self, batch: Any) -> None:
        self._inner.batch_started(batch)

    def batch_finished(self, batch: Any, seconds: float, error: Optional[BaseException]) -> None:
        from .batcher import BatchAborted

        if error is None:
            self.failures_since_success, self.last_ok = 0, time.monotonic()
        elif not isinstance(error, BatchAborted):  # aborted = nobody waited any more, not a model failure
            self.failures_since_success += 1
        self._inner.batch_finished(batch, seconds, error)

    async def check(self) -> None:
        svc = self.service
        if svc.state == "failed":
            raise RuntimeError(f"ditkit replica unhealthy: {svc.detail}")
        if svc.state != "ready":
            return  # loading (Ray's startup covers it) or draining (being replaced anyway)
        idle_for = time.monotonic() - self.last_ok
        if self.failures_since_success == 0 and (idle_for < self.probe_idle_s or not svc.batcher.idle):
            return
        from .app import probe_batch

        probe = probe_batch(svc.info)
        try:
            await asyncio.wait_for(svc.batcher.run_direct(probe), self.probe_timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure of the model is the verdict
            raise RuntimeError(f"ditkit replica unhealthy: the model failed a probe batch "
                               f"({type(e).__name__}: {e})") from e
        self.failures_since_success, self.last_ok = 0, time.monotonic()


# -----------------------------------------------------------------------------------------------
# The proxy side: a replica that died mid-request -> 503
# -----------------------------------------------------------------------------------------------
class ReplicaLostMiddleware:
    """ASGI middleware for Ray's HTTP proxy. When the proxy ends a request without starting a response
    (its replica died, or Ray lost it), answer 503 + Retry-After in the app's error shape instead of the
    bare 500 that uvicorn would send. Responses the app started are never touched."""

    def __init__(self, app: Any, retry_after_s: int = 1):
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            if started:
                raise
            log.warning("a request lost its replica (exception in the proxy): answering 503", exc_info=True)
        if not started:
            await self._unavailable(send)

    async def _unavailable(self, send) -> None:
        body = b'{"detail":"the replica serving this request stopped before answering; retry"}'
        try:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(self.retry_after_s).encode())]})
            await send({"type": "http.response.body", "body": body})
        except Exception:  # noqa: BLE001 - the client went away meanwhile: nobody to tell
            pass


def proxy_middlewares() -> list:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ditkit.serve.ray_app:proxy_middlewares (set on every
    node before `ray start`; `ditkit serve --ray` sets it for the local Ray it starts)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware)]


# -----------------------------------------------------------------------------------------------
# The deployment
# -----------------------------------------------------------------------------------------------
def settings_from_args(args: dict[str, Any]) -> Any:
    """ServeSettings from a dict (the YAML's args), refusing names it does not know."""
    from .app import ServeSettings

    known = {f.name for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UsageError(f"unknown serve settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = dict(args)
    if "api_keys" in values:
        keys = values["api_keys"]
        values["api_keys"] = tuple(k.strip() for k in keys.split(",") if k.strip()) if isinstance(keys, str) \
            else tuple(keys or ())
    settings = ServeSettings(**values)
    settings.validate()
    return settings


if serve is not None:
    @serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=HEALTH_CHECK_PERIOD_S,
                      health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)
    @serve.ingress()  # the app is built on the replica (`__serve_build_asgi_app__`), never pickled
    class DitkitDeployment:
        """One replica: loads the checkpoint, warms the model up, then serves `create_app`'s app."""

        def __init__(self, ckpt: str, settings: dict[str, Any], threads: Optional[int] = None):
            self.ckpt = str(ckpt)
            self.settings = settings_from_args(settings)
            env_keys = tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
            if env_keys:  # keys from the replica's environment (runtime_env), off the config file
                keys = tuple(dict.fromkeys(self.settings.api_keys + env_keys))
                self.settings = dataclasses.replace(self.settings, api_keys=keys)
                self.settings.validate()
            self.threads = threads
            self.health: Optional[ReplicaHealth] = None

        def __serve_build_asgi_app__(self):
            import torch

            from .app import ModelInfo, create_app, probe_batch, run_model_batch

            cpus = self.threads or int(ray_assigned("CPU") or 0) or None
            if cpus:
                torch.set_num_threads(max(1, int(cpus)))
            s = self.settings
            model = s.load(self.ckpt)
            if s.warmup:  # before Ray routes traffic here, so a new replica's first request is not slow
                run_model_batch(model, probe_batch(ModelInfo.of(model, s), guidance_scale=2.0))
            app = create_app(model=model, settings=dataclasses.replace(s, warmup=False))
            self.health = ReplicaHealth(app.state.service)
            log.info("replica %d: %s step %d ready", os.getpid(), model.config.get("model_name"), model.step)
            return app

        async def check_health(self) -> None:
            if self.health is not None:
                await self.health.check()


def ray_assigned(resource: str) -> float:
    """What Ray assigned to this replica of `resource` (0 outside Ray)."""
    try:
        import ray
        ids = ray.get_runtime_context().get_assigned_resources()
        return float(ids.get(resource, 0.0))
    except Exception:  # noqa: BLE001
        return 0.0


def build_app(args: dict[str, Any]):
    """The application builder for `serve run` / `serve deploy` (deploy/ray-serve.yaml):

        import_path: ditkit.serve.ray_app:build_app
        args: {ckpt: /models/mnist, max_batch_size: 64, threads: 1, replicas: 2, autoscale: "1,4", ...}

    `ckpt` is required; `replicas`, `gpus_per_replica`, `cpus_per_replica`, `autoscale`,
    `target_ongoing_requests` and `threads` shape the deployment; every other key is a ServeSettings field.
    The YAML's `deployments:` section may still override any deployment option."""
    require_ray()
    args = dict(args or {})
    ckpt = args.pop("ckpt", None)
    if not ckpt:
        raise UsageError("build_app: args.ckpt (a run folder or a checkpoint folder) is required")
    autoscale = args.pop("autoscale", None)
    if isinstance(autoscale, str):
        autoscale = parse_autoscale(autoscale)
    elif autoscale is not None:
        autoscale = parse_autoscale(",".join(map(str, autoscale)))
    plan = ReplicaPlan(replicas=int(args.pop("replicas", autoscale[0] if autoscale and autoscale[0] else 1)),
                       gpus_per_replica=float(args.pop("gpus_per_replica", 0.0)),
                       cpus_per_replica=float(args.pop("cpus_per_replica", 1.0)), autoscale=autoscale,
                       target_ongoing_requests=int(args.pop("target_ongoing_requests", DEFAULT_TARGET_ONGOING)))
    threads = args.pop("threads", None)
    settings = settings_from_args(args)
    # The shape only (replicas, fractions, MIN..MAX): a cluster may add nodes on demand (Ray's autoscaler),
    # so its current size is no limit here, unlike `ditkit serve --ray`.
    plan.validate(cpus=float("inf"), gpus=float("inf"), where="the cluster")
    return _bind(ckpt, settings, plan, threads)


def _bind(ckpt: str, settings: Any, plan: ReplicaPlan, threads: Optional[int]):
    settings_dict = dataclasses.asdict(settings)
    settings_dict["api_keys"] = list(settings.api_keys)
    return DitkitDeployment.options(**plan.deployment_options(settings)).bind(
        str(ckpt), settings_dict, None if threads is None else int(threads))


# -----------------------------------------------------------------------------------------------
# `ditkit serve --ray`
# -----------------------------------------------------------------------------------------------
def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ray(ckpt: str, settings: Any, plan: ReplicaPlan, *, host: str = "127.0.0.1", port: int = 8000,
              threads: Optional[int] = None, address: Optional[str] = None, quiet: bool = False,
              on_signal: Optional[Callable[..., None]] = None) -> str:
    """Start (or join) Ray, deploy the app and wait until its replicas are up; returns the base URL.
    Joins the cluster at `address` or $RAY_ADDRESS when given, else starts a local Ray on this machine.
    `on_signal`: SIGINT/SIGTERM handler to (re)install once Ray is up (`ray.init` installs a SIGTERM
    handler of its own that aborts the process)."""
    require_ray()
    import ray

    from ..runs import resolve_checkpoint

    resolve_checkpoint(ckpt)  # a bad --ckpt is one line now, not a replica crash loop later
    ckpt = str(os.path.abspath(ckpt))  # replicas do not share the driver's working directory
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # local: check against this machine before starting anything
        cpus, gpus = local_resources()
        plan.validate(cpus, gpus)
    if port == 0:
        port = _free_port(host)
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # inherited by the local Ray's proxy
    # Ray's HTTP proxy is a uvicorn that trusts X-Forwarded-For from 127.0.0.1 unless told otherwise; the
    # replicas rate-limit by the address it reports, so it trusts the same proxies as `ditkit serve`
    # (--forwarded-allow-ips; none by default). A cluster's proxies read this variable on their own nodes.
    os.environ.setdefault(FORWARDED_ALLOW_IPS_ENV, ",".join(settings.forwarded_allow_ips))
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=not quiet, configure_logging=not quiet)
        if address is None:  # "local": a new instance of our own, never someone's `ray start` by accident
            # Ray runs its workers at niceness 15: beside a busy process (a training run) its HTTP proxy took
            # over 15 s to start, failed three 5-s readiness checks and was killed, and serve.start with it.
            # The controller of the Ray started here inherits a longer readiness check (serve.start itself
            # still waits at most 60 s for the proxy).
            os.environ.setdefault(PROXY_READY_ENV, str(PROXY_READY_S))
            cpus, gpus = local_resources()
            kw.update(address="local", num_cpus=int(cpus), num_gpus=int(gpus))
        else:
            kw["address"] = address
        ray.init(**kw)
        _state["own_ray"] = address is None
    if on_signal is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    if address is not None:
        res = ray.cluster_resources()
        plan.validate(res.get("CPU", 0.0), res.get("GPU", 0.0), where=f"the Ray cluster at {address}")
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": settings.timeout_s + 10.0})
    serve.run(_bind(ckpt, settings, plan, threads), name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


_state = {"own_ray": False}  # did start_ray start the Ray instance it is connected to?


def stop_ray() -> None:
    """Stop serving: the replicas drain (up to grace_s). A Ray that start_ray started is shut down; on a
    cluster it joined, only the ditkit app is deleted (other applications keep running)."""
    if serve is None:
        return
    import ray

    if not ray.is_initialized():
        return
    try:
        if _state["own_ray"]:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
        _state["own_ray"] = False


def run_ray(ckpt: str, settings: Any, replicas: int = 1, gpus_per_replica: float = 0.0,
            autoscale: Optional[tuple[int, int] | str] = None, host: str = "127.0.0.1", port: int = 8000,
            threads: Optional[int] = None) -> int:
    """`ditkit serve --ray`: deploy, print where, serve until SIGINT/SIGTERM, then drain and stop."""
    import sys

    require_ray()
    if isinstance(autoscale, str):
        autoscale = parse_autoscale(autoscale)
    if autoscale:  # --replicas is then the initial count, kept inside MIN..MAX (and at least 1)
        replicas = min(max(replicas, autoscale[0], 1), autoscale[1])
    plan = ReplicaPlan(replicas=replicas, gpus_per_replica=gpus_per_replica, autoscale=autoscale)
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        for sig in signals:
            signal.signal(sig, lambda *_: stop.set())
        try:
            url = start_ray(ckpt, settings, plan, host=host, port=port, threads=threads,
                            on_signal=lambda *_: stop.set())
        except DitkitError:
            raise
        except Exception as e:  # Ray's own failures (a replica that cannot start, a busy port): one line
            raise DitkitError(f"--ray: could not start the deployment ({type(e).__name__}: {e})") from None
        scale = f"autoscaling {autoscale[0]}..{autoscale[1]} replicas" if autoscale else f"{plan.replicas} replica(s)"
        print(f"ditkit serve: Ray Serve, {scale}, on {url} (playground /, API docs /docs; batching up to "
              f"{settings.max_batch_size} images per replica). Ctrl-C stops.", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("ditkit serve: stopping: replicas drain", file=sys.stderr, flush=True)
    finally:
        try:
            stop_ray()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0
