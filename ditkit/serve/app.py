"""The HTTP server: FastAPI over the same `sample_batch` that `ditkit sample` calls.

    create_app(model=None, ckpt=None, settings=ServeSettings()) -> FastAPI

Routes
    POST /v1/generate   images for class labels or a prompt ("7", "seven"); PNG or JSON
    GET  /v1/model      what the loaded model accepts (classes, samplers, limits)
    GET  /healthz       liveness: the process answers (never touches the model)
    GET  /readyz        readiness: 200 once the model is loaded and warmed up; 503 while loading or draining
    GET  /metrics       Prometheus text format (a registry per app)
    GET  /              the playground page (self-contained: no script, style or font from the network)
    GET  /docs, /openapi.json

Request path: GuardMiddleware (body size 413, API key 401, token bucket 429) -> validation (422) ->
admission (503 while loading/draining or when the queue is full) -> the Batcher (one worker thread) ->
deadline (504) or the client's disconnect (work cancelled) -> PNG encoding off the event loop.

The app is self-contained (its own registry, batcher, worker thread and limiter), so tests can build
several, and a Ray Serve deployment can wrap the same FastAPI app.
"""

import asyncio
import base64
import ipaddress
import json
import logging
import math
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Sequence

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import DitkitError, UsageError
from ..runs import PRECISIONS, LoadedModel, load_model, read_tuned_setting
from ..sampling import default_settings, sample_batch, to_uint8
from ..samplers import SAMPLERS
from ..samplers.guidance import parse_interval
from ..settings import SamplingSettings, SettingsError
from ..utils import image_seeds, native_bf16, pick_device
from ..viz.grids import make_grid, png_bytes
from .batcher import Batch, Batcher, Job, QueueFull, ServiceStopping
from .body import BodyError, parse_json_body, safe_errors, sanitize
from .limits import ApiKeys, GuardMiddleware, RateLimiter, header_limited_protocol, retry_after_header

log = logging.getLogger("ditkit.serve")

MAX_SEED = 2**63 - 1
RANDOM_SEED_BITS = 53  # drawn seeds stay exact in JavaScript numbers (the playground shows and reuses them)
JSON_FIELDS = {"cfg_scale": "guidance_scale"}  # SamplingSettings field -> its name in the request body
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# -----------------------------------------------------------------------------------------------
# Settings
# -----------------------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    """Everything `ditkit serve` can be told; defaults are the CLI's."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64  # images per model batch; 1 = batching off
    max_wait_ms: float = 10.0  # how long the oldest waiting request waits for companions
    max_queue: int = 256  # requests waiting for the model; beyond: 503 + Retry-After
    rate_limit: float = 10.0  # requests per second per client; 0 = off
    burst: int = 5  # token bucket size per client
    api_keys: tuple[str, ...] = ()  # none: no key needed on /v1/*
    timeout_s: float = 60.0  # per-request deadline, from arrival to images; beyond: 504
    grace_s: float = 30.0  # SIGTERM: how long in-flight requests get to finish
    max_body_bytes: int = 64 * 1024  # beyond: 413
    max_header_bytes: int = 64 * 1024  # request line and headers; beyond: 431 and the connection closed
    # addresses or networks of reverse proxies whose X-Forwarded-For names the client (for rate limits and
    # logs); "*" trusts any peer. None (the default): the TCP peer is the client, whatever the headers say.
    forwarded_allow_ips: tuple[str, ...] = ()
    max_num_samples: int = 16  # images per request
    max_steps: int = 1000  # sampler steps per request
    max_guidance_scale: float = 20.0
    weights: str = "ema"  # when the app loads the checkpoint itself
    device: str = "auto"
    # the network's weights and arithmetic: fp32, bf16, or auto: bf16 where the hardware runs it natively
    # and batching is on (measured here: ~1.6-2x the images/s in batches), fp32 otherwise (one image at
    # a time is faster in fp32). Each precision keeps "one seed, one image"; the two give slightly
    # different images (GET /v1/model says which one serves).
    precision: str = "auto"
    compile: bool = False  # torch.compile the network at load (before /readyz; see load_model)
    quantize: str = "none"  # "int8": the network's token maps in INT8 (ditkit.quantize; fp32 weights, eager)
    # guide (classifier-free and autoguidance) only at sigma in [lo, hi], every request alike; None: every step
    guidance_interval: Optional[tuple[float, float]] = None
    warmup: bool = True  # run one tiny batch before /readyz says ready

    def load(self, ckpt: str | Path) -> LoadedModel:
        """The model these settings serve (weights, device, precision, compilation). Call it on the thread
        that will run the batches (see batcher.model_thread)."""
        return load_model(ckpt, weights=self.weights, device=self.device, precision=self.resolved_precision(),
                          compile=self.compile, quantize=self.quantize)

    def resolved_precision(self) -> str:
        """What `precision` means on this machine: "auto" -> bf16 where native and batching is on."""
        if self.precision != "auto":
            return self.precision
        if self.quantize != "none":  # INT8 quantises fp32 weights
            return "fp32"
        return "bf16" if self.max_batch_size > 1 and native_bf16(pick_device(self.device)) else "fp32"

    def validate(self) -> None:
        """Refuse bad values up front, naming the flag and the allowed range."""
        checks = [
            (1 <= self.max_batch_size <= 4096, f"--max-batch-size {self.max_batch_size}: must be in 1..4096"),
            (0 <= self.max_wait_ms <= 10_000 and math.isfinite(self.max_wait_ms),
             f"--max-wait-ms {self.max_wait_ms}: must be in 0..10000"),
            (1 <= self.max_queue <= 1_000_000, f"--max-queue {self.max_queue}: must be in 1..1000000"),
            (0 <= self.rate_limit and math.isfinite(self.rate_limit),
             f"--rate-limit {self.rate_limit}: must be a finite number >= 0 (0 = off)"),
            (self.rate_limit == 0 or self.burst >= 1, f"--burst {self.burst}: must be >= 1 when rate limiting is on"),
            (0 < self.timeout_s <= 86_400, f"--timeout-s {self.timeout_s}: must be in (0, 86400]"),
            (0 <= self.grace_s <= 86_400, f"--grace-s {self.grace_s}: must be in 0..86400"),
            (0 <= self.port <= 65535, f"--port {self.port}: must be in 0..65535"),
            (self.max_body_bytes >= 1024, f"max_body_bytes {self.max_body_bytes}: must be >= 1024"),
            (1 <= self.max_num_samples <= 256, f"max_num_samples {self.max_num_samples}: must be in 1..256"),
            (1 <= self.max_steps, f"--max-steps {self.max_steps}: must be >= 1"),
            (0 <= self.max_guidance_scale and math.isfinite(self.max_guidance_scale),
             f"max_guidance_scale {self.max_guidance_scale}: must be a finite number >= 0"),
            (self.weights in ("ema", "model"), f"--weights {self.weights!r}: allowed values are ema, model"),
            (self.precision in ("auto", *PRECISIONS),
             f"--precision {self.precision!r}: allowed values are auto, {', '.join(PRECISIONS)}"),
            (self.quantize in ("none", "int8"), f"--quantize {self.quantize!r}: allowed values are none, int8"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.guidance_interval is not None:  # a pair, or "LO,HI" as in a Ray YAML file
            self.guidance_interval = parse_interval(self.guidance_interval)
        if not 1024 <= self.max_header_bytes <= 16 * 2**20:
            raise UsageError(f"--max-header-bytes {self.max_header_bytes}: must be in 1024..16777216")
        self.forwarded_allow_ips = parse_forwarded_allow_ips(self.forwarded_allow_ips)
        for key in self.api_keys:
            if len(key) < 8 or any(c.isspace() for c in key):
                raise UsageError("--api-key: a key needs at least 8 characters and no spaces")


def parse_forwarded_allow_ips(value: str | Sequence[str]) -> tuple[str, ...]:
    """Trusted proxies: "10.0.0.1,10.1.0.0/16", a sequence of such, or "*" (any peer); () for none."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item != "*":
            try:  # uvicorn reads "10.1.0.5/16" as a name, not a network: pass it on as 10.1.0.0/16
                item = str(ipaddress.ip_network(item, strict=False) if "/" in item else ipaddress.ip_address(item))
            except ValueError:
                raise UsageError(f"--forwarded-allow-ips {item!r}: not an IP address or network "
                                 "(e.g. 10.0.0.1, 10.0.0.0/8, ::1), or * for any") from None
        out.append(item)
    return tuple(out)


# -----------------------------------------------------------------------------------------------
# What the model accepts
# -----------------------------------------------------------------------------------------------
def serving_samplers(model: Optional[LoadedModel]) -> list[str]:
    """Samplers the server offers: fixed-grid ones (the adaptive ODE couples the images of a batch, so a
    request's images would depend on its neighbours) that this model's objective supports."""
    names = []
    for name, spec in SAMPLERS.items():
        if spec.nfe(2) is None:
            continue
        if model is not None:
            try:
                SamplingSettings(sampler=name, steps=1).validate(model)
            except UsageError:  # a SettingsError: another kind of sampler than the model's, ...
                continue
        names.append(name)
    return names


@dataclass(frozen=True)
class ModelInfo:
    name: str
    step: int
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]
    samplers: list[str]
    max_steps: int
    autoguidance: bool = False  # the model has a weak model (RUN/guide) to autoguide with
    precision: str = "fp32"  # the network's arithmetic (each precision gives its own images)
    compiled: bool = False  # the network runs through torch.compile (its images are its own too)
    quantize: str = "none"  # "int8": the token maps run in INT8 (its images are its own too)
    text: bool = False  # a text model (MM-DiT): draws from a free-text prompt, guided against the empty prompt
    default_sampler: str = SamplingSettings.sampler  # the model's own default (sampling.default_settings) ...
    default_steps: int = SamplingSettings.steps  # ... where the server offers it
    # what a request that names no sampling field gets: the run's tuned setting (RUN/sampling.json, `ditkit
    # tune`) where it has one, else its family's default; rejection, a redraw loop, stays with the CLI
    defaults: SamplingSettings = field(default_factory=SamplingSettings)

    @staticmethod
    def of(model: LoadedModel, settings: ServeSettings) -> "ModelInfo":
        limit = getattr(model.objective, "num_timesteps", None)
        samplers = serving_samplers(model)
        max_steps = min(settings.max_steps, limit) if limit else settings.max_steps
        own = (read_tuned_setting(model.run_dir) if model.run_dir is not None else None) or default_settings(model)
        return ModelInfo(defaults=own, name=str(model.config.get("model_name", "DiT")), step=model.step,
                         num_classes=model.num_classes, class_names=model.class_names if model.num_classes else [],
                         image_shape=tuple(model.image_shape), samplers=samplers, max_steps=max_steps,
                         autoguidance=model.guide is not None, precision=model.precision,
                         compiled=model.compiled, quantize=getattr(model, "quantize", "none"),
                         text=getattr(model, "text_encoder", None) is not None,
                         default_sampler=_default_sampler(samplers, own.sampler),
                         default_steps=min(own.steps, max_steps))

    @property
    def conditional(self) -> bool:
        """Whether guidance applies: a class or a text model (an unconditional one has nothing to guide by)."""
        return self.num_classes > 0 or self.text

    def as_json(self, settings: ServeSettings) -> dict[str, Any]:
        return {"model": self.name, "step": self.step, "num_classes": self.num_classes,
                "class_names": self.class_names, "image_shape": list(self.image_shape), "samplers": self.samplers,
                "default_sampler": self.default_sampler, "default_steps": self.default_steps,
                "max_steps": self.max_steps, "max_num_samples": settings.max_num_samples,
                "max_guidance_scale": settings.max_guidance_scale if self.conditional else 1.0,
                "guidance": self.conditional, "text": self.text, "autoguidance": self.autoguidance, "precision": self.precision,
                "compiled": self.compiled, "quantize": self.quantize,
                # [lo, hi] in sigma (hi null: no upper bound), or null: guidance at every step
                "guidance_interval": None if settings.guidance_interval is None else
                [settings.guidance_interval[0], None if math.isinf(settings.guidance_interval[1])
                 else settings.guidance_interval[1]]}


def _default_sampler(samplers: Sequence[str], preferred: str = SamplingSettings.sampler) -> str:
    return preferred if preferred in samplers or not samplers else samplers[0]


PROBE_PROMPT = "a picture"  # what a text model's probe batch draws (run_model_batch)


def probe_batch(info: ModelInfo, guidance_scale: float = 1.0) -> Batch:
    """One image, two steps of the default sampler, in no request: the warm-up batch (the first batch
    pays for lazy initialisation) and a Ray replica's health probe."""
    guided = info.conditional
    settings = SamplingSettings(sampler=info.default_sampler, steps=min(2, info.max_steps),
                                cfg_scale=(guidance_scale if guided else 1.0,), autoguidance=(1.0,))
    return Batch([0 if info.num_classes > 0 else -1], [0], settings, pieces=[])


def parse_prompt(prompt: str, class_names: Sequence[str]) -> Optional[int]:
    """A class id for a prompt: a class name ("7", "cat"), a class id, or a digit's English name ("seven")
    when the classes are the digits. None when it names no class."""
    p = " ".join(prompt.strip().lower().split()).rstrip(".!")
    names = [c.lower() for c in class_names]
    if p in names:
        return names.index(p)
    if p in DIGIT_WORDS and str(DIGIT_WORDS.index(p)) in names:
        return names.index(str(DIGIT_WORDS.index(p)))
    # ASCII only: str.isdigit also holds for "²" and "①", which int() refuses (and int() would read
    # other scripts' digits, "٧", which no client means as a class id)
    if p.isascii() and p.isdigit() and int(p) < len(names):
        return int(p)
    return None


# -----------------------------------------------------------------------------------------------
# The HTTP schema
# -----------------------------------------------------------------------------------------------
class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong and, where it helps, what is allowed")


class ValidationErrorItem(BaseModel):
    loc: list[str | int] = Field(description='where: ["body", field, index]')
    msg: str
    type: str
    input: Any = Field(None, description="the refused value (strings cut at 200 characters)")
    ctx: Optional[dict[str, Any]] = None


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="one base64-encoded PNG per image")
    labels: list[int] = Field(description="the class id of each image (-1: unconditional)")
    seed: int = Field(description="the request's seed (drawn at random when the request gave none)")
    seeds: list[int] = Field(description="each image's own generator seed: image_seeds(seed, num_samples)")
    sampler: str
    steps: int
    guidance_scale: float
    autoguidance: float = 1.0
    prompt_truncated: bool = Field(False, description="a text model's prompt was longer than its encoder's max "
                                   "tokens and was truncated to them (also the X-Prompt-Truncated header)")
    latency_ms: float = Field(description="from arrival to images ready, PNG encoding included")
    queue_ms: float = Field(description="time spent waiting for a batch")


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "draining", "failed", "stopped"]
    detail: str = ""


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 3 and 3.0 alike; never a string or a boolean (strict mode refuses those)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**bounds: Any) -> Any:
    """An integer field type with bounds (ge=, le=) that the JSON schema shows as minimum / maximum."""
    return Annotated[int, Field(strict=True, **bounds), BeforeValidator(_json_integer)]


def build_request_model(settings: ServeSettings, info: Optional[ModelInfo]) -> type[BaseModel]:
    """The request body model; its bounds come from the settings and, when known, the model, so
    /openapi.json tells clients the real limits (a fuzzer's schema-valid bodies are then accepted)."""
    samplers = info.samplers if info is not None else serving_samplers(None)
    sampler_type = Literal[tuple(samplers)]  # type: ignore[valid-type]
    label_max = info.num_classes - 1 if info is not None and info.num_classes > 0 else None
    max_steps = info.max_steps if info is not None else settings.max_steps
    default_sampler = info.default_sampler if info is not None else _default_sampler(samplers)
    default_steps = info.default_steps if info is not None else min(SamplingSettings.steps, max_steps)
    guide_max = settings.max_guidance_scale if info is None or info.conditional else 1.0
    ag_max = settings.max_guidance_scale if info is None or info.autoguidance else 1.0
    n_max = settings.max_num_samples
    own = info.defaults if info is not None else SamplingSettings()
    default_cfg = float(own.cfg_scale) if isinstance(own.cfg_scale, (int, float)) and own.cfg_scale <= guide_max else 1.0
    default_ag = float(own.autoguidance) if isinstance(own.autoguidance, (int, float)) and own.autoguidance <= ag_max \
        else 1.0
    Label = json_int(ge=0, le=label_max)
    schema_extra: dict[str, Any] = {"examples": [{"prompt": "seven", "num_samples": 4, "steps": 20,
                                                  "guidance_scale": 4.0, "seed": 1, "format": "json"}]}
    if info is not None and info.num_classes > 0:  # a class model: exactly one of labels and prompt
        schema_extra["oneOf"] = [{"required": ["labels"]}, {"required": ["prompt"]}]

    class GenerateRequest(BaseModel):
        """Generate `num_samples` images for class `labels` (cycled) or a `prompt`."""

        model_config = ConfigDict(extra="forbid", json_schema_extra=schema_extra)

        # labels, prompt and num_samples are left out when not wanted (no null), so a schema can say
        # "exactly one of labels and prompt".
        labels: list[Label] = Field(
            None, min_length=1, max_length=n_max,
            description="class ids, cycled to num_samples (give labels or prompt, not both)")
        prompt: str = Field(
            None, min_length=1, max_length=100,
            description="a class model: a class name or id, or a digit's English name (\"7\", \"seven\"); a text "
                        "model (MMDiT-*): free text, truncated to its encoder's max tokens (see prompt_truncated)")
        num_samples: json_int(ge=1, le=n_max) = Field(
            None, description="images to generate (default: the number of labels, else 1)")
        sampler: sampler_type = Field(default_sampler, description="the sampling method")
        steps: json_int(ge=1, le=max_steps) = Field(default_steps, description="sampler steps")
        guidance_scale: Annotated[float, Field(strict=True, allow_inf_nan=False)] = Field(
            default_cfg, ge=1.0 if guide_max == 1.0 else 0.0, le=guide_max,
            description="classifier-free guidance (1 = off, 0 = unconditional)")
        autoguidance: Annotated[float, Field(strict=True, allow_inf_nan=False)] = Field(
            default_ag, ge=1.0 if ag_max == 1.0 else 0.0, le=ag_max,
            description="autoguidance by the run's early weights (Karras et al. 2024; 1 = off)")
        seed: Optional[json_int(ge=0, le=MAX_SEED)] = Field(
            None, description="the same seed gives the same images; drawn at random if absent")
        format: Literal["png", "json"] = Field(
            "png", description="png: one image, or a grid of several; json: base64 PNGs, seeds and timings")

    return GenerateRequest


# -----------------------------------------------------------------------------------------------
# Metrics
# -----------------------------------------------------------------------------------------------
class ServeMetrics:
    """Prometheus metrics in a registry of this app's own. Also the batcher's observer."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ditkit_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "code"], registry=r)
        self.duration = Histogram("ditkit_http_request_duration_seconds", "HTTP request duration", ["route"],
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120),
                                  registry=r)
        self.queue_wait = Histogram("ditkit_queue_wait_seconds", "time a request waits for its first batch",
                                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                    registry=r)
        self.queue_depth = Gauge("ditkit_queue_depth", "requests waiting for the model", registry=r)
        self.queue_images = Gauge("ditkit_queue_images", "images waiting for the model", registry=r)
        self.batch_size = Histogram("ditkit_batch_size_images", "images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_seconds = Histogram("ditkit_batch_duration_seconds", "model time per batch",
                                       buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.rejections = Counter("ditkit_rejections", "requests refused or abandoned, by reason", ["reason"],
                                  registry=r)
        self.images = Counter("ditkit_images_generated", "images returned to clients", registry=r)
        self.inflight = Gauge("ditkit_inflight_requests", "generate requests admitted and not yet answered",
                              registry=r)
        self.ready = Gauge("ditkit_ready", "1 when the model is loaded, warmed up and not draining", registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # present from the start, at 0

    # BatchObserver
    def queue_changed(self, jobs: int, images: int) -> None:
        self.queue_depth.set(jobs)
        self.queue_images.set(images)

    def batch_started(self, batch: Batch) -> None:
        self.batch_size.observe(len(batch))
        for job, start, _ in batch.pieces:
            if start == 0 and job.queue_wait_s is not None:
                self.queue_wait.observe(job.queue_wait_s)

    def batch_finished(self, batch: Batch, seconds: float, error: Optional[BaseException]) -> None:
        self.batch_seconds.observe(seconds)


class PromptCacheCollector:
    """A text model's prompt-cache counters (ditkit.text.TextEncoder.stats), read at each scrape."""

    def __init__(self, model: Callable[[], Any]):
        self.model = model

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        encoder = getattr(self.model(), "text_encoder", None)
        if encoder is None:
            return
        stats = encoder.stats()
        yield CounterMetricFamily("ditkit_prompt_cache_hits", "prompts whose encoding came from the cache",
                                  value=stats["hits"])
        yield CounterMetricFamily("ditkit_prompt_cache_misses", "prompts the text encoder ran on",
                                  value=stats["misses"])


REJECTION_REASONS = ("queue_full", "rate_limited", "deadline", "client_disconnected", "unauthorized",
                     "auth_throttled", "body_too_large", "draining", "not_ready", "invalid", "internal")


REQUEST_ID_MAX_CHARS = 128
access_logger = logging.getLogger("ditkit.serve.access")


def request_id(given: Optional[bytes]) -> str:
    """The client's X-Request-ID when it is 1..128 printable ASCII characters, else a new random one."""
    if given and len(given) <= REQUEST_ID_MAX_CHARS and all(0x20 <= c <= 0x7E for c in given):
        return given.decode("ascii")
    return secrets.token_hex(16)


class LogBudget:
    """At most `per_s` log lines a second for one kind of line (refusals), the rest counted: a client
    storm becomes a few lines a second, each carrying how many were left out since the last one."""

    def __init__(self, per_s: float = 10.0, clock=time.monotonic):
        self.per_s = per_s
        self.clock = clock
        self.tokens = per_s
        self.updated = clock()
        self.suppressed = 0

    def take(self) -> Optional[int]:
        """None: leave this line out; else the number left out before it (then reset)."""
        now = self.clock()
        self.tokens = min(self.per_s, self.tokens + (now - self.updated) * self.per_s)
        self.updated = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return None
        self.tokens -= 1.0
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class AccessMiddleware:
    """The outermost layer: a request id for every request (the client's valid `X-Request-ID`, else a new
    one; echoed in every response), Prometheus counts by route template (unknown paths: "other", so
    labels stay bounded), and one JSON log line per request on the "ditkit.serve.access" logger:

        {"request_id", "method", "path", "status", "latency_ms", "client",
         and for generate requests: "seed", "images", "queue_ms", "batch_sizes"}

    Refusals (4xx, 503) share a budget of lines a second (LogBudget), so a retry storm does not turn into
    a logging storm. A client that left before any answer was started (say, before sending its body) is
    counted as 499, never as a 500 that was not sent."""

    def __init__(self, app, metrics: ServeMetrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.refusal_log = LogBudget()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        method = scope.get("method", "GET") if scope.get("method") in _METHODS else "OTHER"
        given = None
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                given = value
                break
        rid = request_id(given)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        code: Optional[int] = None
        t0 = time.perf_counter()

        async def send_wrapper(message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if code is None:
                code = 500  # the server answers 500 for an exception before any answer
            raise
        finally:
            if code is None:
                code = 499  # nginx's "client closed request": nothing was sent, nobody is waiting
                self.metrics.rejections.labels("client_disconnected").inc()
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(route, method, str(code)).inc()
            self.metrics.duration.labels(route).observe(seconds)
            if access_logger.isEnabledFor(logging.INFO):
                self._log(scope, state, rid, code, seconds)

    def _log(self, scope, state: dict, rid: str, code: int, seconds: float) -> None:
        record: dict[str, Any] = {"request_id": rid, "method": scope.get("method"),
                                  "path": sanitize(scope["path"])[:200], "status": code,
                                  "latency_ms": round(seconds * 1000, 3),
                                  "client": (scope.get("client") or ("unknown", 0))[0]}
        if 400 <= code < 500 or code == 503:
            suppressed = self.refusal_log.take()
            if suppressed is None:
                return
            if suppressed:
                record["refusals_not_logged"] = suppressed
        job = state.get("job")
        if job is not None:
            wait_s = job.queue_wait_s
            record.update(seed=state.get("seed"), images=job.n, sampler=job.settings.sampler, steps=job.settings.steps,
                          queue_ms=None if wait_s is None else round(wait_s * 1000, 3),
                          batch_sizes=job.batch_sizes)
        access_logger.info(json.dumps(record))


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# -----------------------------------------------------------------------------------------------
# The service: model, batcher, readiness, admission
# -----------------------------------------------------------------------------------------------
def run_model_batch(model: LoadedModel, batch: Batch) -> np.ndarray:
    """The worker thread's job: the library's sample_batch with the batch's settings (one seed and one
    pair of guidance scales per image)."""
    prompts = batch.prompts
    if prompts is None and not batch.pieces and getattr(model, "text_encoder", None) is not None:
        prompts = [PROBE_PROMPT] * len(batch)  # a text model's warm-up or health probe (no request)
    x = sample_batch(model, batch.labels, batch.seeds, batch.settings, prompts=prompts,
                     callback=batch.check_abandoned)
    return to_uint8(x)  # (B, H, W, C) uint8


@dataclass
class _Admission:
    job: Job
    future: asyncio.Future
    t0: float  # monotonic arrival time
    seed: int  # the request's seed (given or drawn)
    prompt_truncated: bool = False  # a text model's prompt was cut to its encoder's max tokens


class Service:
    """One app's state. `state`: loading -> ready -> draining -> stopped (or failed)."""

    def __init__(self, settings: ServeSettings, model: Optional[LoadedModel], ckpt: Optional[str],
                 executor: Optional[ThreadPoolExecutor] = None):
        self.settings = settings
        self.model = model
        self.ckpt = ckpt
        self.info: Optional[ModelInfo] = ModelInfo.of(model, settings) if model is not None else None
        self.metrics = ServeMetrics()
        self.metrics.registry.register(PromptCacheCollector(lambda: self.model))
        self.limiter = RateLimiter(settings.rate_limit, settings.burst)
        self.api_keys = ApiKeys(settings.api_keys)
        self.batcher = Batcher(self._run_batch, max_batch_size=settings.max_batch_size,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                               observer=self.metrics, executor=executor)
        self.state = "loading"
        self.detail = "the model is loading"
        self.inflight = 0
        self._startup: Optional[asyncio.Task] = None

    def _run_batch(self, batch: Batch) -> np.ndarray:
        return run_model_batch(self.model, batch)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.batcher.start()
        self._startup = asyncio.get_running_loop().create_task(self._load_and_warm_up(), name="ditkit-load")

    async def _load_and_warm_up(self) -> None:
        try:
            if self.model is None:
                self.model = await self.batcher.run_in_worker(self.settings.load, self.ckpt)
                self.info = ModelInfo.of(self.model, self.settings)
            if not self.info.samplers:
                raise DitkitError("no fixed-grid sampler supports this model's objective")
            if self.settings.warmup:  # the first batch pays for lazy initialisation; not a client
                t0 = time.perf_counter()
                await self.batcher.run_direct(probe_batch(self.info, guidance_scale=2.0))
                log.info("warm-up batch took %.2f s", time.perf_counter() - t0)
        except Exception as e:  # readiness says why; liveness stays up so the operator can look
            log.exception("model loading failed")
            self.state, self.detail = "failed", f"model loading failed: {e}"
            return
        if self.state == "loading":
            self.state, self.detail = "ready", ""
            self.metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Stop admitting work; /readyz answers 503 from now on."""
        if self.state in ("loading", "ready", "failed"):
            self.state, self.detail = "draining", "the server is shutting down"
            self.metrics.ready.set(0)

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting work and wait up to `grace_s` for admitted requests; True if all finished.
        Past the grace period the remaining work is abandoned and its clients answered 503."""
        self.begin_drain()
        end = time.monotonic() + grace_s
        while (self.inflight > 0 or not self.batcher.idle) and time.monotonic() < end:
            await asyncio.sleep(0.02)
        drained = self.inflight == 0 and self.batcher.idle
        if not drained:
            log.warning("grace period of %.1f s over: abandoning %d request(s)", grace_s, self.inflight)
            await self.batcher.stop()
            end = time.monotonic() + 2.0
            while self.inflight > 0 and time.monotonic() < end:  # let their handlers answer 503
                await asyncio.sleep(0.02)
        return drained

    async def stop(self) -> None:
        if self.state != "stopped":
            await self.drain(self.settings.grace_s)
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        await self.batcher.stop()
        self.state, self.detail = "stopped", "the server has stopped"
        self.metrics.ready.set(0)

    def abort(self) -> None:
        """Abandon everything now (a second SIGTERM); safe to call from a signal handler."""
        self.batcher._stopping = True

    # ---- requests ----------------------------------------------------------------------------
    def reject(self, status: int, reason: str, detail: str, retry_after_s: Optional[float] = None) -> HTTPException:
        self.metrics.rejections.labels(reason).inc()
        headers = {"Retry-After": retry_after_header(retry_after_s)} if retry_after_s is not None else None
        return HTTPException(status, detail, headers=headers)

    def invalid(self, loc: tuple, msg: str, value: Any) -> RequestValidationError:
        """A 422 in FastAPI's own shape, for checks that need the model (label range, sampler, prompt)."""
        return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}])

    def resolve_labels(self, req: BaseModel) -> list[int]:
        info = self.info
        n_given = req.num_samples
        if info.num_classes == 0:
            for name in ("labels", "prompt"):
                if getattr(req, name) is not None:
                    raise self.invalid((name,), "this model is unconditional: leave labels and prompt out",
                                       getattr(req, name))
            return [-1] * (n_given or 1)
        if req.labels is not None and req.prompt is not None:
            raise self.invalid(("prompt",), "give labels or prompt, not both", req.prompt)
        if req.prompt is not None:
            label = parse_prompt(req.prompt, info.class_names)
            if label is None:
                names = ", ".join(info.class_names[:20])
                words = " or a digit's English name" if all(c.isdigit() for c in info.class_names) else ""
                raise self.invalid(("prompt",), f"names no class of this model; give a class name or id "
                                   f"({names}){words}", req.prompt)
            labels = [label]
        elif req.labels is not None:
            labels = list(req.labels)
            for i, v in enumerate(labels):
                if not 0 <= v < info.num_classes:
                    raise self.invalid(("labels", i), f"class ids are 0..{info.num_classes - 1}", v)
        else:
            raise self.invalid(("labels",), "give labels (class ids) or a prompt", None)
        n = n_given or len(labels)
        if len(labels) > n:
            raise self.invalid(("labels",), f"{len(labels)} labels for num_samples={n}: give at most "
                               "num_samples labels (they are cycled)", labels)
        return [labels[i % len(labels)] for i in range(n)]

    def refuse_early(self, scope: dict[str, Any]) -> Optional[tuple[int, str, str, Optional[float]]]:
        """The cheap half of admission, made by GuardMiddleware before the body is read: a generate
        request that would be refused whatever its body says (draining, not ready, the queue full) is
        answered at once, for a few attribute reads (limits.Refusal)."""
        if scope["path"] != "/v1/generate" or scope.get("method") != "POST":
            return None
        if self.state == "draining" or self.state == "stopped":
            return 503, "draining", "the server is shutting down; retry on another replica", 1.0
        if self.state != "ready":
            return 503, "not_ready", self.detail or "the model is not ready", 1.0
        if self.batcher.queue_depth >= self.batcher.max_queue:
            return 503, "queue_full", (f"the server is busy: {self.batcher.queue_depth} requests are waiting; "
                                       "retry later"), self.batcher.batch_seconds_ewma or 1.0
        return None

    def sampling_settings(self, req: BaseModel) -> SamplingSettings:
        """The request's one SamplingSettings (the server's guidance interval included), validated against
        the model; a SettingsError becomes a 422 at the JSON field it names."""
        try:
            return SamplingSettings(sampler=req.sampler, steps=req.steps, cfg_scale=float(req.guidance_scale),
                                    autoguidance=float(req.autoguidance),
                                    guidance_interval=self.settings.guidance_interval or self.info.defaults.guidance_interval,
                                    ).validate(self.model)
        except SettingsError as e:
            name = JSON_FIELDS.get(e.field, e.field)
            if name not in type(req).model_fields:  # a server setting the model refuses: not the client's doing
                raise
            raise self.invalid((name,), e.message, getattr(req, name)) from None

    def admit(self, req: BaseModel) -> _Admission:
        """Validate against the model and queue the work; raises the HTTP answer when refused."""
        t0 = time.monotonic()
        if self.state == "draining" or self.state == "stopped":
            raise self.reject(503, "draining", "the server is shutting down; retry on another replica", 1)
        if self.state != "ready":
            raise self.reject(503, "not_ready", self.detail or "the model is not ready", 1)
        prompts, truncated = self.resolve_prompts(req)
        labels = self.resolve_labels(req) if prompts is None else [-1] * len(prompts)
        if req.sampler not in self.info.samplers:
            raise self.invalid(("sampler",), f"allowed: {', '.join(self.info.samplers)}", req.sampler)
        sampling = self.sampling_settings(req)
        seed = req.seed if req.seed is not None else secrets.randbits(RANDOM_SEED_BITS)
        job = Job(labels, image_seeds(seed, len(labels)), sampling, prompts=prompts)
        try:
            future = self.batcher.submit(job)
        except QueueFull:
            wait = self.batcher.batch_seconds_ewma or 1.0
            raise self.reject(503, "queue_full", f"the server is busy: {self.batcher.queue_depth} requests are "
                              "waiting; retry later", wait) from None
        except ServiceStopping:
            raise self.reject(503, "draining", "the server is shutting down; retry on another replica", 1) from None
        return _Admission(job, future, t0, seed, truncated)

    def resolve_prompts(self, req: BaseModel) -> tuple[Optional[list[str]], bool]:
        """A text model's (MM-DiT) prompt, repeated to num_samples, and whether it was truncated to the encoder's
        max tokens (answered, not refused); (None, False) for a class model, whose prompt names a class."""
        encoder = getattr(self.model, "text_encoder", None)
        if encoder is None:
            return None, False
        if req.labels is not None:
            raise self.invalid(("labels",), "this model draws from text: give a prompt, not labels", req.labels)
        if req.prompt is None or not req.prompt.strip():
            raise self.invalid(("prompt",), "this model draws from text: give a non-empty prompt", req.prompt)
        truncated = encoder.inspect([req.prompt])[0]["truncated"]
        return [req.prompt] * (req.num_samples or 1), truncated

    async def generate(self, req: BaseModel, request: Request) -> Response:
        adm = self.admit(req)
        state = request.scope.setdefault("state", {})  # for AccessMiddleware's log line
        state["job"], state["seed"] = adm.job, adm.seed
        self.inflight += 1
        self.metrics.inflight.inc()
        disconnected = asyncio.get_running_loop().create_task(_wait_disconnect(request))
        try:
            left = adm.t0 + self.settings.timeout_s - time.monotonic()
            done, _ = await asyncio.wait({adm.future, disconnected}, timeout=max(left, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if adm.future not in done:
                self.batcher.cancel(adm.job)
                if disconnected in done:
                    self.metrics.rejections.labels("client_disconnected").inc()
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
                raise self.reject(504, "deadline", f"not done within the server's deadline of "
                                  f"{self.settings.timeout_s:g} s")
            try:
                images = adm.future.result()
            except ServiceStopping as e:
                raise self.reject(503, "draining", f"{e}; retry on another replica", 1) from None
            except Exception as e:  # the model failed: an honest 500, logged by the batcher
                self.metrics.rejections.labels("internal").inc()
                raise HTTPException(500, f"the model failed on this batch ({type(e).__name__})") from None
            return await self._respond(req, adm, images)
        except asyncio.CancelledError:
            self.batcher.cancel(adm.job)
            raise
        finally:
            disconnected.cancel()
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def _respond(self, req: BaseModel, adm: _Admission, images: np.ndarray) -> Response:
        job = adm.job
        seed = adm.seed
        if req.format == "png":
            body = await asyncio.to_thread(lambda: png_bytes(images[0] if job.n == 1 else make_grid(images)))
            latency_ms = (time.monotonic() - adm.t0) * 1000
            self.metrics.images.inc(job.n)
            headers = {"X-Seed": str(seed), "X-Image-Seeds": ",".join(map(str, job.seeds)),
                       "X-Labels": ",".join(map(str, job.labels)), "X-Latency-Ms": f"{latency_ms:.1f}",
                       "X-Queue-Ms": f"{(job.queue_wait_s or 0) * 1000:.1f}", "Cache-Control": "no-store"}
            if adm.prompt_truncated:
                headers["X-Prompt-Truncated"] = "true"
            return Response(body, media_type="image/png", headers=headers)
        encoded = await asyncio.to_thread(lambda: [base64.b64encode(png_bytes(im)).decode() for im in images])
        latency_ms = (time.monotonic() - adm.t0) * 1000
        self.metrics.images.inc(job.n)
        out = GenerateResponse(images=encoded, labels=job.labels, seed=seed, seeds=job.seeds,
                               sampler=job.settings.sampler, steps=job.settings.steps, guidance_scale=job.scales[0],
                               autoguidance=job.autoguidance[0], prompt_truncated=adm.prompt_truncated,
                               latency_ms=round(latency_ms, 3),
                               queue_ms=round((job.queue_wait_s or 0) * 1000, 3))
        return JSONResponse(out.model_dump(), headers={"Cache-Control": "no-store"})


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so `receive` only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -----------------------------------------------------------------------------------------------
# The app
# -----------------------------------------------------------------------------------------------
_ERRORS = {400: "the body could not be read at all (malformed JSON is a 422)",
           401: "missing or invalid API key", 413: "request body too large",
           429: "over the client's rate limit (see Retry-After)",
           503: "loading, draining, or the queue is full (see Retry-After)",
           504: "the server-side deadline passed"}


def create_app(model: Optional[LoadedModel] = None, ckpt: Optional[str | Path] = None,
               settings: Optional[ServeSettings] = None, executor: Optional[ThreadPoolExecutor] = None) -> FastAPI:
    """The server for a loaded `model`, or for a checkpoint `ckpt` that the app loads after it starts
    (/readyz says 503 until then). executor: the thread the model was loaded on (`batcher.model_thread()`),
    which then runs its batches: one OpenMP team in the process. Test hooks:
    `app.state.service.batcher.pause()` / `.resume()`."""
    settings = settings or ServeSettings()
    settings.validate()
    if model is None and ckpt is None:
        raise UsageError("create_app: give a loaded model or a checkpoint")
    service = Service(settings, model, None if ckpt is None else str(ckpt), executor)
    Request_ = build_request_model(settings, service.info)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    from .. import __version__
    app = FastAPI(title="ditkit", version=__version__, lifespan=lifespan,
                  description="Diffusion Transformer image generation. Class models take `labels` or a `prompt`.")
    app.state.service = service
    app.state.settings = settings

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, except that it must always encode: a body may carry NaN or Infinity
        # (Python's json module reads them) or a lone surrogate ("\ud800"), which echoed back as `input`
        # or in `loc` (an unknown key) would not encode as JSON or UTF-8 (see body.safe_errors).
        service.metrics.rejections.labels("invalid").inc()
        return JSONResponse({"detail": safe_errors(exc.errors())}, status_code=422)

    def parse_body(raw: bytes, content_type: Optional[str]) -> BaseModel:
        """The request model from the raw body: one JSON value (no duplicate keys, bounded nesting; see
        body.parse_json_body), validated like FastAPI's body parameter would (errors under "body")."""
        try:
            return Request_.model_validate(parse_json_body(raw, content_type))
        except BodyError as e:
            raise RequestValidationError(e.errors) from None
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                          for err in e.errors(include_url=False)]) from None

    # The body is read by parse_body, not by a FastAPI body parameter; the schema goes into the
    # OpenAPI document by hand (see `openapi` below), so clients and fuzzers still see it.
    @app.post("/v1/generate", response_model=None, tags=["generate"],
              summary="Generate images",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}},
              responses={200: {"model": GenerateResponse, "description": "format=json: the images as base64 PNGs; "
                               "format=png: one PNG (a grid when several)",
                               "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                         **{code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()},
                         422: {"model": ValidationErrorResponse, "description": "the body is not a valid request "
                               "(malformed JSON, a duplicate key, an unknown field, a value out of range)"},
                         500: {"model": ErrorResponse, "description": "the model itself failed"}})
    async def generate(request: Request) -> Response:
        body = parse_body(await request.body(), request.headers.get("content-type"))
        return await service.generate(body, request)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {})["GenerateRequest"] = \
                Request_.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    _add_read_routes(app, service, settings)
    routes = frozenset(r.path for r in app.routes)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_keys=service.api_keys,
                       limiter=service.limiter, refuse_early=service.refuse_early,
                       on_reject=lambda reason: service.metrics.rejections.labels(reason).inc())
    app.add_middleware(AccessMiddleware, metrics=service.metrics, routes=routes)
    return app


def _add_read_routes(app: FastAPI, service: "Service", settings: ServeSettings) -> None:
    """The GET routes: what the model accepts, the probes, the metrics and the playground page."""
    @app.get("/v1/model", tags=["generate"], summary="What the model accepts",
             responses={503: {"model": ErrorResponse, "description": "the model is not loaded yet"}})
    async def model_info() -> dict[str, Any]:
        if service.info is None:
            raise HTTPException(503, "the model is loading", headers={"Retry-After": "1"})
        return service.info.as_json(settings)

    @app.get("/healthz", tags=["probes"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], summary="Readiness", response_model=ReadyResponse,
             responses={503: {"model": ReadyResponse, "description": "loading, draining or failed"}})
    async def readyz() -> JSONResponse:
        body = ReadyResponse(status=service.state, detail=service.detail).model_dump()
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}, response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = _playground_template()

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        config = service.info.as_json(settings) if service.info is not None else None
        data = json.dumps({"info": config, "auth": bool(settings.api_keys)}).replace("<", "\\u003c")
        return HTMLResponse(page.replace("/*__DITKIT_CONFIG__*/null", data), headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'",
            "Cache-Control": "no-store"})


def _playground_template() -> str:
    return resources.files("ditkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")


# -----------------------------------------------------------------------------------------------
# Running it: uvicorn with a draining SIGTERM
# -----------------------------------------------------------------------------------------------
try:
    import uvicorn
except ModuleNotFoundError:  # pragma: no cover - uvicorn is a dependency; the app itself does not need it
    uvicorn = None


if uvicorn is not None:
    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains instead of closing the listener at once: /readyz
        turns 503 (load balancers see it, since connections are still accepted), new work is refused
        with 503, admitted requests finish within `grace_s`, then the server exits (status 0). A second
        signal exits at once."""

        def __init__(self, config: "uvicorn.Config", service: Service, grace_s: float):
            super().__init__(config)
            self.service = service
            self.grace_s = grace_s
            self._drain_requested = False
            self._drain_task: Optional[asyncio.Task] = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._drain_requested or self.should_exit:
                self.service.abort()
                self.force_exit = True
                self.should_exit = True
                return
            log.warning("signal %s: draining (grace period %.0f s)", signal.Signals(sig).name, self.grace_s)
            self._drain_requested = True  # picked up by on_tick within 0.1 s, on the event loop

        async def on_tick(self, counter: int) -> bool:
            if self._drain_requested and self._drain_task is None:
                self._drain_task = asyncio.get_running_loop().create_task(self.service.drain(self.grace_s))
            if self._drain_task is not None and self._drain_task.done():
                self.should_exit = True
            return await super().on_tick(counter)

    def make_server(app: FastAPI, *, host: Optional[str] = None, port: Optional[int] = None,
                    log_level: str = "info", access_log: bool = True, **uvicorn_kw: Any) -> DrainingServer:
        """A DrainingServer for an app made by create_app (host/port default to the app's settings).

        access_log: one JSON line per request on stderr (AccessMiddleware; uvicorn's own access log
        stays off: it would say the same less). X-Forwarded-For is read only from the settings'
        `forwarded_allow_ips`; request heads are capped at `max_header_bytes` (431)."""
        settings: ServeSettings = app.state.settings
        if access_log and not access_logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            access_logger.addHandler(handler)
            access_logger.setLevel(logging.INFO)
            access_logger.propagate = False
        try:
            import httptools  # noqa: F401  (uvicorn's faster parser; h11 otherwise)
            http: Any = header_limited_protocol(settings.max_header_bytes)
        except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
            http = "h11"
        uvicorn_kw.setdefault("http", http)
        config = uvicorn.Config(app, host=host or settings.host, port=settings.port if port is None else port,
                                lifespan="on", log_level=log_level, access_log=False, server_header=False,
                                timeout_graceful_shutdown=5, proxy_headers=bool(settings.forwarded_allow_ips),
                                forwarded_allow_ips=list(settings.forwarded_allow_ips),
                                h11_max_incomplete_event_size=settings.max_header_bytes, **uvicorn_kw)
        return DrainingServer(config, app.state.service, settings.grace_s)
