"""What a client may send the server: a per-client token bucket, API keys and a request body size cap.

`GuardMiddleware` is a plain ASGI middleware (no `BaseHTTPMiddleware`, which breaks client-disconnect
detection) placed in front of the FastAPI app. For every request it checks, in this order:

1. the body size (`max_body_bytes`; 413), for every route — the body is read here, at most
   `max_body_bytes + 1` bytes of it, and handed on to the app;
2. on the API routes (`/v1/...`) only: the API key (401) and then the client's token bucket (429 with
   `Retry-After`). Probes (`/healthz`, `/readyz`), `/metrics`, the playground page and the docs stay open.

Clients are told apart by their API key when keys are configured (each key is one client), and by their
IP address otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class _Bucket:
    tokens: float
    updated: float  # monotonic seconds of the last refill


class RateLimiter:
    """Token buckets, one per client: `rate_per_s` tokens a second, at most `burst` in the bucket.

    A request takes one token. A client that finds its bucket empty is told how many seconds until the
    next token (`Retry-After`). `rate_per_s <= 0` turns limiting off. Buckets of clients unseen for long
    enough to be full again carry no information and are forgotten first; at most `max_clients` are kept
    (least recently used dropped), so memory stays bounded whatever the number of clients.
    """

    def __init__(self, rate_per_s: float, burst: int, *, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        if rate_per_s > 0 and burst < 1:
            raise ValueError(f"burst must be >= 1 when rate limiting is on, got {burst}")
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self.max_clients = int(max_clients)
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, client: str) -> float:
        """Take one token for `client`. Returns 0.0 if allowed, else the seconds until a token is free."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        b = self._buckets.get(client)
        if b is None:
            b = _Bucket(float(self.burst), now)
            self._buckets[client] = b
            self._evict()
        else:
            b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate_per_s)
            b.updated = now
            self._buckets.move_to_end(client)
        if b.tokens >= 1.0 - 1e-9:  # float clocks: 100.1 - 100.0 is a hair under 0.1
            b.tokens = max(0.0, b.tokens - 1.0)
            return 0.0
        return (1.0 - b.tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self) -> None:
        if len(self._buckets) <= self.max_clients:
            return
        now = self.clock()
        full_after_s = self.burst / self.rate_per_s
        for key in [k for k, b in self._buckets.items() if now - b.updated >= full_after_s]:
            del self._buckets[key]
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


def retry_after_header(seconds: float) -> str:
    """HTTP Retry-After is whole seconds; never 0, so a client does not retry in a tight loop."""
    return str(max(1, math.ceil(seconds)))


class ApiKeys:
    """The accepted API keys (none: no key needed). Keys are compared in constant time."""

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, headers: dict[bytes, bytes]) -> Optional[str]:
        """The client id of a request carrying a valid key (`Authorization: Bearer KEY` or `X-API-Key: KEY`),
        or None when it carries no valid key."""
        given = []
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            given.append(token.strip())
        if headers.get(b"x-api-key"):
            given.append(headers[b"x-api-key"].strip())
        for g in given:
            ok = False
            for k in self._keys:  # no early exit: the time taken does not tell which key matched
                ok |= hmac.compare_digest(g, k)
            if ok:
                return "key:" + hashlib.sha256(g).hexdigest()[:16]
        return None


class GuardMiddleware:
    """Body size cap, API keys and per-client rate limiting in front of the app (see the module doc).

    `on_reject(reason)` is called for every refused request (a metrics hook): reasons are
    "body_too_large", "unauthorized" and "rate_limited".
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_keys: ApiKeys, limiter: RateLimiter,
                 protected_prefix: str = "/v1/", on_reject: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.api_keys = api_keys
        self.limiter = limiter
        self.protected_prefix = protected_prefix
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])  # later duplicates win; fine for these headers
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                await _reply(send, 400, "Content-Length is not a number")
                return
            if too_big:
                await self._too_large(send)
                return

        protected = scope["path"].startswith(self.protected_prefix)
        if protected:
            client = self._client_id(scope, headers)
            if client is None:
                self.on_reject("unauthorized")
                await _reply(send, 401, "missing or invalid API key: send 'Authorization: Bearer KEY' or "
                             "'X-API-Key: KEY'", [(b"www-authenticate", b"Bearer")])
                return
            wait_s = self.limiter.acquire(client)
            if wait_s > 0:
                self.on_reject("rate_limited")
                await _reply(send, 429, f"rate limit of {self.limiter.rate_per_s:g} requests/s "
                             f"(burst {self.limiter.burst}) exceeded; retry in {wait_s:.2f} s",
                             [(b"retry-after", retry_after_header(wait_s).encode())])
                return

        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away before sending its body: nothing to answer
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    await self._too_large(send)
                    return
                if not message.get("more_body", False):
                    break
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    def _client_id(self, scope: Scope, headers: dict[bytes, bytes]) -> Optional[str]:
        if self.api_keys.enabled:
            return self.api_keys.check(headers)
        host = (scope.get("client") or ("unknown", 0))[0]
        return f"ip:{host}"

    async def _too_large(self, send: Send) -> None:
        self.on_reject("body_too_large")
        await _reply(send, 413, f"request body larger than {self.max_body_bytes} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body once, then the original channel (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, detail: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": payload})
