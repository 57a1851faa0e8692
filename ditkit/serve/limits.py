"""What a client may send the server: a per-client token bucket, API keys, a request body size cap, and
a cap on the request head (`header_limited_protocol`, in uvicorn's connection handling).

`GuardMiddleware` is a plain ASGI middleware (no `BaseHTTPMiddleware`, which breaks client-disconnect
detection) placed in front of the FastAPI app. For every request it checks, in this order:

1. the declared body size (`Content-Length` over `max_body_bytes`; 413), for every route;
2. on the API routes (`/v1/...`) only: failed API-key attempts (429 with `Retry-After` once an address
   has failed `AUTH_FAILURES` times in `AUTH_WINDOW_S`, whatever key it sends next), the API key (401),
   the client's token bucket (429 with `Retry-After`), and `refuse_early`: the app's cheap admission
   check (503 while the queue is full or the server is not ready), made before the body is read;
3. the body, read here (at most `max_body_bytes + 1` bytes of it; 413) and handed on to the app.

Probes (`/healthz`, `/readyz`), `/metrics`, the playground page and the docs stay open. Every refusal
before the body is a few dictionary lookups and one small answer. A connection that comes back before
the Retry-After it was given (a client that ignores it, in a tight loop) has its next 429/503 held until
then, and is looked at again first: under such a storm the server answers about one refusal per client
per Retry-After, and keeps its CPU (and the GIL) for the model (benchmarks/serve_storm.py).

Clients are told apart by their API key when keys are configured (each key is one client), and by their
IP address otherwise. The address is the TCP peer's: `X-Forwarded-For` counts only from the proxies that
`ditkit serve --forwarded-allow-ips` names (none by default), or any client could pick its own bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict, deque
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


AUTH_FAILURES = 5  # failed API-key attempts an address may make in AUTH_WINDOW_S ...
AUTH_WINDOW_S = 60.0  # ... before every attempt from it is refused (429) until the oldest ages out


class FailedAuthThrottle:
    """Failed API-key attempts per client address, over a sliding window: after `max_failures` failures
    in `window_s` seconds, the address is refused until its oldest failure leaves the window, so keys
    cannot be guessed at the server's request rate. Memory: at most `max_clients` addresses (least
    recently failed dropped first), `max_failures` timestamps each."""

    def __init__(self, max_failures: int = AUTH_FAILURES, window_s: float = AUTH_WINDOW_S, *,
                 max_clients: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_failures = int(max_failures)
        self.window_s = float(window_s)
        self.max_clients = int(max_clients)
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked_for(self, client: str) -> float:
        """Seconds until `client` may try a key again (0.0: now)."""
        times = self._failures.get(client)
        if times is None:
            return 0.0
        now = self.clock()
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            del self._failures[client]
            return 0.0
        return times[0] + self.window_s - now if len(times) >= self.max_failures else 0.0

    def failed(self, client: str) -> None:
        times = self._failures.get(client)
        if times is None:
            times = self._failures[client] = deque(maxlen=self.max_failures)
            if len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(client)
        times.append(self.clock())


# (status, reason, detail, retry_after_s or None): what `refuse_early` answers for a request it refuses
Refusal = tuple[int, str, str, Optional[float]]
HOLD_MAX_S = 2.0  # the longest a refusal to a client that ignores Retry-After is held back
MAX_HELD_PEERS = 100_000  # connections whose Retry-After time is remembered (least recent forgotten)


class GuardMiddleware:
    """Body size cap, API keys, failed-key throttling, per-client rate limiting and the app's cheap
    admission check in front of the app (see the module doc).

    `on_reject(reason)` is called for every refused request (a metrics hook): reasons are
    "body_too_large", "unauthorized", "auth_throttled", "rate_limited" and those of `refuse_early`.
    `refuse_early(scope)`: None to go on, or a `Refusal`, answered before the body is read.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_keys: ApiKeys, limiter: RateLimiter,
                 protected_prefix: str = "/v1/", on_reject: Callable[[str], None] = lambda reason: None,
                 auth_throttle: Optional[FailedAuthThrottle] = None,
                 refuse_early: Callable[[Scope], Optional[Refusal]] = lambda scope: None):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.api_keys = api_keys
        self.limiter = limiter
        self.protected_prefix = protected_prefix
        self.on_reject = on_reject
        self.auth_throttle = auth_throttle or FailedAuthThrottle()
        self.refuse_early = refuse_early
        self._retry_at: OrderedDict[tuple, float] = OrderedDict()  # (address, port) -> its Retry-After time

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
            address = "ip:" + (scope.get("client") or ("unknown", 0))[0]
            if self.api_keys.enabled:
                blocked_s = self.auth_throttle.blocked_for(address)
                if blocked_s > 0:
                    self.on_reject("auth_throttled")
                    await _reply(send, 429, f"{self.auth_throttle.max_failures} failed API-key attempts in "
                                 f"{self.auth_throttle.window_s:g} s from this address; retry in {blocked_s:.0f} s",
                                 [(b"retry-after", retry_after_header(blocked_s).encode())])
                    return
                client = self.api_keys.check(headers)
                if client is None:
                    self.auth_throttle.failed(address)
            else:
                client = address
            if client is None:
                self.on_reject("unauthorized")
                await _reply(send, 401, "missing or invalid API key: send 'Authorization: Bearer KEY' or "
                             "'X-API-Key: KEY'", [(b"www-authenticate", b"Bearer")])
                return
            held = False
            while True:
                refusal = self._refusal(client, scope)
                if refusal is None:
                    break
                status, reason, detail, retry_after_s = refusal
                peer = scope.get("client")
                now = time.monotonic()
                if not held and peer and peer[1] and now < self._retry_at.get(peer, 0.0):
                    # This connection was refused and told Retry-After, and is back before it: it ignores
                    # Retry-After. Its answer waits until then (a sleeping task; no work), and the request
                    # is looked at again: there may be room by then. A client retrying in a tight loop
                    # thus costs one refusal per Retry-After, not thousands a second.
                    held = True
                    await asyncio.sleep(min(self._retry_at[peer] - now, HOLD_MAX_S))
                    continue
                extra = []
                if retry_after_s is not None:
                    retry_after = retry_after_header(retry_after_s)
                    extra.append((b"retry-after", retry_after.encode()))
                    if peer and peer[1]:
                        self._remember_retry(peer, now + int(retry_after))
                self.on_reject(reason)
                await _reply(send, status, detail, extra)
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

    def _refusal(self, client: str, scope: Scope) -> Optional[Refusal]:
        """The client's token bucket (429), then the app's cheap admission check (`refuse_early`)."""
        wait_s = self.limiter.acquire(client)
        if wait_s > 0:
            return (429, "rate_limited", f"rate limit of {self.limiter.rate_per_s:g} requests/s (burst "
                    f"{self.limiter.burst}) exceeded; retry in {wait_s:.2f} s", wait_s)
        return self.refuse_early(scope)

    def _remember_retry(self, peer: tuple, retry_at: float) -> None:
        """When the connection `peer` (address, port) was told it may retry; at most MAX_HELD_PEERS kept."""
        self._retry_at[peer] = retry_at
        self._retry_at.move_to_end(peer)
        while len(self._retry_at) > MAX_HELD_PEERS:
            self._retry_at.popitem(last=False)

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


LINGER_S = 1.0  # after a 431: how long a connection's further bytes are read and dropped before it closes


def header_limited_protocol(max_header_bytes: int) -> type:
    """uvicorn's httptools connection, refusing a request head (request line and headers) larger than
    `max_header_bytes` with 431 and closing the connection.

    httptools buffers a header until it is complete before uvicorn sees it, so a cap in the ASGI app would
    come after the whole head was read (16 MB, say). Here the bytes a connection receives while a head is
    incomplete are counted as they arrive; memory held for one head stays under the cap plus one socket
    read. (uvicorn's h11 backend has this cap built in: `h11_max_incomplete_event_size`.)"""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    payload = json.dumps({"detail": f"request headers larger than {max_header_bytes} bytes"}).encode()
    answer = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload))

    class HeaderLimitedHttpTools(HttpToolsProtocol):
        _head_bytes: Optional[int] = 0  # received since the current head began; None while in a body
        _refused = False

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # answered 431: what the client still sends is dropped unread
            counting = self._head_bytes is not None
            if counting:
                self._head_bytes += len(data)
            super().data_received(data)
            # still in the same head after this read (its end would have set None): over the cap?
            if counting and self._head_bytes is not None and self._head_bytes > max_header_bytes:
                self._refuse()

        def _refuse(self) -> None:
            if self.transport.is_closing():
                return
            self._refused = True
            self.transport.write(answer)
            # Closing with the client's bytes still arriving would reset the connection, and the reset
            # can destroy the answer before the client reads it: half-close, drop what comes for a
            # moment (a lingering close, as web servers do), then close.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_bytes is None:
                self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_bytes = 0

    return HeaderLimitedHttpTools
