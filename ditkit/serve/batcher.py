"""Dynamic batching: requests that arrive close together run as one model batch.

One asyncio task forms batches; one worker thread runs them (torch releases the GIL, so the event loop
keeps answering probes and admitting requests meanwhile). The rules:

- A batch holds images of requests with the same *key*: their sampling settings but for the guidance
  scales (sampler, steps, spacing, options, schedule, interval). Labels, guidance scales and seeds mix
  freely, because image b of a batch depends only on its own (label, seed, scales) (docs/DESIGN.md contract
  3). Requests with another key wait for a later batch, oldest first.
- A batch waits at most `max_wait_ms` for companions, counted from the later of its oldest request's
  arrival and the end of the previous batch; it closes early once it has `max_batch_size` images.
  (Counting from the arrival alone, requests that queued up during a long batch would start the next
  one at once, before the clients just answered could come back: under a closed loop of N clients the
  batches then settle at ~N/2 images each, two cohorts taking turns; measured: mean batch 16.2 at 32
  clients.) A request larger than the room left is split across batches (its images
  do not depend on the split), so `max_batch_size=1` turns batching off.
- At most `max_queue` requests wait; `submit` raises `QueueFull` beyond that, so the caller can answer 503.
- A cancelled request (client gone, deadline passed) leaves the queue at once; if it is in the running
  batch, its images are dropped, and a batch whose requests are all cancelled is aborted between two
  sampler steps.
- `pause()` / `resume()` hold the batcher before it takes the next batch (a test hook that makes queue
  behaviour deterministic; also usable by an operator).

The batcher knows nothing of models or HTTP: `run_batch(Batch) -> uint8 (B, H, W, C)` does the work.
A job's `settings` is a frozen dataclass with fields `cfg_scale` and `autoguidance` (ditkit's
SamplingSettings), read here only to tell the per-image scales from what a batch shares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class ServiceStopping(Exception):
    """The batcher is stopping: the request was not (fully) run."""


class BatchAborted(Exception):
    """Raised inside `run_batch` (through `Batch.check_abandoned`) when no one waits for the batch any more."""


def _per_image(value: Any, n: int, name: str) -> list[float]:
    """A guidance scale given once or once per image -> one float per image."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"a job needs one {name} per image ({n}), got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * n


@dataclass(eq=False)
class Job:
    """One request: `n` images with their labels and seeds, drawn with `settings` (a SamplingSettings;
    its cfg_scale and autoguidance one value, or one per image)."""

    labels: list[int]
    seeds: list[int]
    settings: Any
    prompts: Optional[list[str]] = None  # a text model's prompt per image (its labels are then -1)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None  # when its first image entered a batch
    batch_sizes: list[int] = field(default_factory=list)  # the size of each batch its images ran in
    cancelled: bool = False  # read by the worker thread; only ever set to True
    future: Optional[asyncio.Future] = None
    _images: Optional[np.ndarray] = None  # (n, H, W, C) filled piece by piece
    _handed_out: int = 0  # images given to batches so far
    _done: int = 0  # images finished
    scales: list[float] = field(init=False)  # classifier-free guidance, per image
    autoguidance: list[float] = field(init=False)  # per image (1 = off)
    key: Any = field(init=False)  # what a batch shares: the settings but for the per-image scales

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.seeds) >= 1:
            raise ValueError("a job needs as many labels as seeds (at least one)")
        n = len(self.seeds)
        self.scales = _per_image(self.settings.cfg_scale, n, "cfg_scale")
        self.autoguidance = _per_image(self.settings.autoguidance, n, "autoguidance")
        self.key = dataclasses.replace(self.settings, cfg_scale=1.0, autoguidance=1.0)  # compared with ==

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def queue_wait_s(self) -> Optional[float]:
        return None if self.started_at is None else self.started_at - self.enqueued_at


@dataclass
class Batch:
    """What the worker runs: images `labels[b], seeds[b]` drawn with `settings`, whose cfg_scale and
    autoguidance hold one value per image."""

    labels: list[int]
    seeds: list[int]
    settings: Any
    pieces: list[tuple[Job, int, int]]  # (job, first image of the job, count), in batch order
    stopping: Callable[[], bool] = lambda: False
    prompts: Optional[list[str]] = None  # a text model's prompt per image

    def __len__(self) -> int:
        return len(self.seeds)

    def abandoned(self) -> bool:
        """True once every request of the batch is cancelled, or the server stops (thread-safe read).
        A batch of no request (the warm-up) is abandoned only when the server stops."""
        return self.stopping() or (bool(self.pieces) and all(job.cancelled for job, _, _ in self.pieces))

    def check_abandoned(self, *_: object) -> None:
        """A sampler callback: raises BatchAborted between two steps once nobody waits for the result."""
        if self.abandoned():
            raise BatchAborted()


class BatchObserver(Protocol):
    """Metrics hooks (all called on the event loop)."""

    def queue_changed(self, jobs: int, images: int) -> None: ...

    def batch_started(self, batch: Batch) -> None: ...

    def batch_finished(self, batch: Batch, seconds: float, error: Optional[BaseException]) -> None: ...


class _NoObserver:
    def queue_changed(self, jobs: int, images: int) -> None:
        pass

    def batch_started(self, batch: Batch) -> None:
        pass

    def batch_finished(self, batch: Batch, seconds: float, error: Optional[BaseException]) -> None:
        pass


def model_thread(name: str = "ditkit-model") -> ThreadPoolExecutor:
    """The one thread on which a server runs all of its torch work: loading, compiling, warming up and
    every batch.

    PyTorch's CPU parallelism is OpenMP, and each OS thread that enters a parallel region gets its own
    team of worker threads. Two teams (the model loaded on one thread, batches run on another) exceed
    the cores of a small machine; OpenMP then stops spinning between regions and every region pays a
    wake-up. Measured here, one guided image on a thread whose process already had a second team:
    1.26 cores used and p50 80-106 ms, against 2.0 cores and 60-75 ms with one team."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


class Batcher:
    """Forms batches on the event loop, runs them on one worker thread. Use `start()` inside a running loop.

    executor: the worker thread (`model_thread()`); give the one the model was loaded on. Without one, the
    batcher makes its own at each `start()`."""

    def __init__(self, run_batch: Callable[[Batch], np.ndarray], *, max_batch_size: int = 64,
                 max_wait_ms: float = 10.0, max_queue: int = 256, observer: Optional[BatchObserver] = None,
                 thread_name: str = "ditkit-model", executor: Optional[ThreadPoolExecutor] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.observer = observer or _NoObserver()
        self._thread_name = thread_name
        self._queue: deque[Job] = deque()
        self._given_executor = executor
        self._executor: Optional[ThreadPoolExecutor] = None
        self._task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None
        self._running: Optional[asyncio.Event] = None  # cleared = paused
        self._paused = False
        self._stopping = False
        self._busy = False  # a batch is on the worker thread
        self._free_at = float("-inf")  # time.monotonic() when the last batch ended
        self.batch_seconds_ewma: Optional[float] = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching task on the running event loop (and the worker thread)."""
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        if not self._paused:
            self._running.set()
        self._stopping = False
        self._executor = self._given_executor or model_thread(self._thread_name)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ditkit-batcher")

    async def stop(self) -> None:
        """Stop: abort the running batch at its next step, fail every waiting request with ServiceStopping."""
        self._stopping = True
        self.fail_waiting(ServiceStopping("the server is shutting down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            if self._executor is not self._given_executor:  # a given one belongs to its giver
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def run_in_worker(self, fn: Callable, *args, **kwargs):
        """Run fn on the worker thread (e.g. loading the model there: see `model_thread`)."""
        assert self._executor is not None, "start() the batcher first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def run_direct(self, batch: Batch) -> np.ndarray:
        """Run one batch on the worker thread outside the queue (warm-up)."""
        assert self._executor is not None, "start() the batcher first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, batch)

    def pause(self) -> None:
        """Hold the batcher before it takes its next batch (the running batch, if any, finishes)."""
        self._paused = True
        if self._running is not None:
            self._running.clear()

    def resume(self) -> None:
        self._paused = False
        if self._running is not None:
            self._running.set()

    @property
    def paused(self) -> bool:
        return self._paused

    # ---- state -------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting (some of whose images have not yet entered a batch)."""
        return len(self._queue)

    @property
    def queued_images(self) -> int:
        return sum(j.n - j._handed_out for j in self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future:
        """Queue `job`; returns a future of (images uint8 (n, H, W, C)). Raises QueueFull or ServiceStopping."""
        if self._stopping or self._task is None:
            raise ServiceStopping("the batcher is not running")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are waiting (the limit)")
        job.future = asyncio.get_running_loop().create_future()
        job.enqueued_at = time.monotonic()
        self._queue.append(job)
        self._queue_changed()
        self._wake.set()
        return job.future

    def cancel(self, job: Job) -> None:
        """Drop `job`: out of the queue now; its images in the running batch are discarded."""
        if job.cancelled:
            return
        job.cancelled = True
        if self._dequeue(job) and self._wake is not None:
            self._wake.set()
        if job.future is not None and not job.future.done():
            job.future.cancel()

    def fail_waiting(self, error: BaseException) -> None:
        """Fail every waiting request with `error` (shutdown)."""
        while self._queue:
            job = self._queue.popleft()
            job.cancelled = True
            if job.future is not None and not job.future.done():
                job.future.set_exception(error)
        self._queue_changed()

    def _queue_changed(self) -> None:
        self.observer.queue_changed(len(self._queue), self.queued_images)

    # ---- the batching loop -------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stall every request until its deadline
                log.exception("the batching loop failed; going on")
                await asyncio.sleep(0.1)

    async def _step(self) -> None:
        """Wait for work, form one batch and run it."""
        await self._running.wait()
        if not self._queue:
            await self._wait_wake(None)
            return
        head = self._queue[0]
        close_at = max(head.enqueued_at, self._free_at) + self.max_wait_s
        # Wait for companions of the same key, until the batch is full or the wait (see the module's
        # docstring) is over.
        while (self._running.is_set() and self._queue and self._queue[0] is head
               and self._images_waiting(head.key) < self.max_batch_size):
            left = close_at - time.monotonic()
            if left <= 0:
                break
            await self._wait_wake(left)
        if not self._running.is_set() or not self._queue or self._queue[0] is not head:
            return  # paused meanwhile, or the head was cancelled: start over
        await self._execute(self._take(head.key))

    async def _wait_wake(self, timeout: Optional[float]) -> None:
        self._wake.clear()
        try:
            if timeout is None:
                await self._wake.wait()
            else:
                await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _images_waiting(self, key: Any) -> int:
        return sum(j.n - j._handed_out for j in self._queue if j.key == key)

    def _take(self, key: Any) -> Batch:
        """Up to max_batch_size images of `key`, oldest requests first; a request may be split."""
        room = self.max_batch_size
        pieces: list[tuple[Job, int, int]] = []
        now = time.monotonic()
        for job in list(self._queue):
            if room == 0:
                break
            if job.key != key:
                continue
            count = min(room, job.n - job._handed_out)
            pieces.append((job, job._handed_out, count))
            if job.started_at is None:
                job.started_at = now
            job._handed_out += count
            room -= count
            if job._handed_out == job.n:
                self._queue.remove(job)
        self._queue_changed()
        size = self.max_batch_size - room
        labels, seeds, scales, ag, prompts = [], [], [], [], []
        for job, start, count in pieces:
            job.batch_sizes.append(size)
            labels += job.labels[start:start + count]
            seeds += job.seeds[start:start + count]
            scales += job.scales[start:start + count]
            ag += job.autoguidance[start:start + count]
            if job.prompts is not None:  # one model per server: every job of a text model has prompts
                prompts += job.prompts[start:start + count]
        settings = dataclasses.replace(key, cfg_scale=tuple(scales), autoguidance=tuple(ag))
        return Batch(labels, seeds, settings, pieces, stopping=lambda: self._stopping, prompts=prompts or None)

    async def _execute(self, batch: Batch) -> None:
        self.observer.batch_started(batch)
        self._busy = True
        t0 = time.perf_counter()
        error: Optional[BaseException] = None
        images: Optional[np.ndarray] = None
        try:
            images = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, batch)
        except BatchAborted as e:
            error = e
        except asyncio.CancelledError:
            self._busy = False
            for job, _, _ in batch.pieces:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(ServiceStopping("the server is shutting down"))
            raise
        except Exception as e:  # a model failure: every request of the batch gets it
            log.exception("batch of %d images (%s) failed", len(batch), batch.settings)
            error = e
        finally:
            self._busy = False
            self._free_at = time.monotonic()
        seconds = time.perf_counter() - t0
        if error is None:
            self.batch_seconds_ewma = seconds if self.batch_seconds_ewma is None else (
                0.8 * self.batch_seconds_ewma + 0.2 * seconds)
        self.observer.batch_finished(batch, seconds, error)
        offset = 0
        for job, start, count in batch.pieces:
            fut = job.future
            if fut is not None and not fut.done() and not job.cancelled:
                if error is not None:
                    self._fail(job, error if not isinstance(error, BatchAborted)
                               else ServiceStopping("the server is shutting down"))
                else:
                    if job._images is None:
                        job._images = np.empty((job.n, *images.shape[1:]), dtype=images.dtype)
                    job._images[start:start + count] = images[offset:offset + count]
                    job._done += count
                    if job._done == job.n:
                        fut.set_result(job._images)
            offset += count

    def _dequeue(self, job: Job) -> bool:
        """Take `job` out of the queue; whether it was there (a job already taken into a batch is not)."""
        try:
            self._queue.remove(job)
        except ValueError:
            return False
        self._queue_changed()
        return True

    def _fail(self, job: Job, error: BaseException) -> None:
        """Fail `job` and drop the rest of it (a request split across batches) from the queue."""
        job.cancelled = True
        self._dequeue(job)
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)
