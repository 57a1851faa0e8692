"""Load test of `ditkit serve` on loopback: throughput and latency with batching on and off, and a soak.

    python benchmarks/serve_load.py --ckpt runs/mnist --levels 1,8,32,128 --duration-s 30 \\
        --soak-minutes 10 --out results.json

For each mode (batched: --max-batch-size 64; unbatched: --max-batch-size 1) the script starts its own
server (`python -m ditkit serve`, rate limiting off, a deep queue) on a free 127.0.0.1 port, then runs
closed-loop clients: each sends one request (one image, `--steps` steps, guidance `--guidance`, a random
digit and seed), waits for the answer and sends the next. Per level: a short warm-up, then `--duration-s`
of measurement; throughput counts the answers that arrive inside the window. The soak runs the batched
server at `--soak-clients` for `--soak-minutes`, sampling the server's resident memory (VmRSS) every
few seconds. Everything is bounded in time, and every request goes to 127.0.0.1 only.

Prints a markdown table (for docs/BENCHMARKS.md) and the issue's checks: at 32 clients batched
throughput >= 4x unbatched, p99 <= 3x p50; zero 5xx; memory growth < 5% over the soak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import httpx

HOST = "127.0.0.1"  # loopback only, by construction
MODES = {"batched": {"max_batch_size": 64, "max_wait_ms": 10.0}, "unbatched": {"max_batch_size": 1, "max_wait_ms": 0.0}}
MODES.update({f"{m}-{p}": dict(k, precision=p) for m, k in list(MODES.items()) for p in ("fp32", "bf16")})
MODES.update({f"{m}-compiled": dict(k, compile=True) for m, k in list(MODES.items())})  # --compile


@dataclass
class LevelResult:
    mode: str
    clients: int
    duration_s: float
    ok: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    req_per_s: float = 0.0
    img_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch: float = 0.0
    model_busy: float = 0.0
    precision: str = ""  # what the server runs (GET /v1/model): its --precision, "auto" resolved
    # CPU use in cores (CPU-seconds per wall second) over the level: the server's main thread (uvicorn's
    # event loop: HTTP, validation, PNG, metrics), its other threads (the model worker and its OpenMP
    # threads), and the load generator itself, which shares the machine
    cpu_http: float = 0.0
    cpu_model: float = 0.0
    cpu_clients: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.status_counts.items() if code.startswith("5"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


# -----------------------------------------------------------------------------------------------
# The server under test
# -----------------------------------------------------------------------------------------------
class Server:
    def __init__(self, ckpt: str, mode: str, args: argparse.Namespace, log_dir: Path):
        with socket.socket() as s:  # a port free now; the server binds it a moment later
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.precision = ""
        knobs = MODES[mode]
        cmd = [sys.executable, "-m", "ditkit", "serve", "--ckpt", ckpt, "--host", HOST, "--port", str(self.port),
               "--max-batch-size", str(knobs["max_batch_size"]), "--max-wait-ms",
               str(knobs["max_wait_ms"] if knobs["max_batch_size"] == 1 or args.max_wait_ms is None else args.max_wait_ms),
               "--rate-limit", "0", "--max-queue", "100000", "--timeout-s", str(args.request_timeout_s),
               "--grace-s", "10", "--no-access-log", "--log-level", "warning", "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += ["--precision", knobs.get("precision", args.precision)]
        cmd += ["--compile"] if knobs.get("compile") else []
        self.log_path = log_dir / f"server-{mode}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    self.precision = httpx.get(self.url + "/v1/model", timeout=5).json().get("precision", "")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server was not ready within {timeout_s:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def rss_mib(self) -> Optional[float]:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def thread_cpu_s(self) -> tuple[float, float]:
        """(main thread, all other threads) CPU seconds of the server so far, from /proc (Linux)."""
        tick, main, other = os.sysconf("SC_CLK_TCK"), 0.0, 0.0
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a thread that just ended
            cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            if int(task.name) == self.proc.pid:
                main += cpu
            else:
                other += cpu
        return main, other

    def batch_stats(self) -> tuple[float, float, float]:
        """(batches, images, model seconds) run so far, from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        names = ("ditkit_batch_size_images_count", "ditkit_batch_size_images_sum", "ditkit_batch_duration_seconds_sum")
        vals = {}
        for line in text.splitlines():
            for name in names:
                if line.startswith(name + " "):
                    vals[name] = float(line.split()[1])
        return tuple(vals.get(name, 0.0) for name in names)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# -----------------------------------------------------------------------------------------------
# Closed-loop clients
# -----------------------------------------------------------------------------------------------
async def run_level(url: str, clients: int, *, warmup_s: float, duration_s: float, body_args: dict,
                    request_timeout_s: float, seed: int) -> tuple[list[float], dict[str, int], int, int]:
    """Returns (latencies of OK answers in the window, status counts in the window, transport errors, ok)."""
    rng = random.Random(seed)
    t_start = time.monotonic()
    window = (t_start + warmup_s, t_start + warmup_s + duration_s)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=request_timeout_s) as http:
        async def client() -> None:
            nonlocal errors
            while time.monotonic() < window[1]:
                body = dict(body_args, labels=[rng.randrange(10)], seed=rng.randrange(2**31))
                t0 = time.monotonic()
                try:
                    r = await http.post("/v1/generate", json=body)
                    code = str(r.status_code)
                except httpx.HTTPError:
                    code = "transport"
                t1 = time.monotonic()
                if window[0] <= t1 <= window[1]:
                    if code == "transport":
                        errors += 1
                    else:
                        statuses[code] = statuses.get(code, 0) + 1
                        if code == "200":
                            latencies.append((t1 - t0) * 1000)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, statuses, errors, statuses.get("200", 0)


def measure(server: Server, mode: str, clients: int, args: argparse.Namespace) -> LevelResult:
    batches0, images0, busy0 = server.batch_stats()
    (http0, model0), client0 = server.thread_cpu_s(), time.process_time()
    t0 = time.monotonic()
    lat, statuses, errors, ok = asyncio.run(run_level(
        server.url, clients, warmup_s=args.warmup_s, duration_s=args.duration_s, body_args=request_body(args),
        request_timeout_s=args.request_timeout_s, seed=clients))
    (http1, model1), client1 = server.thread_cpu_s(), time.process_time()
    batches1, images1, busy1 = server.batch_stats()
    wall = time.monotonic() - t0
    res = LevelResult(mode, clients, args.duration_s, ok=ok, status_counts=statuses, transport_errors=errors)
    res.req_per_s = ok / args.duration_s
    res.img_per_s = res.req_per_s  # one image per request
    res.p50_ms, res.p99_ms = percentile(lat, 50), percentile(lat, 99)
    res.mean_batch = (images1 - images0) / max(batches1 - batches0, 1)  # warm-up and drain included
    res.precision = server.precision
    res.model_busy = (busy1 - busy0) / wall  # the share of the wall time the model worker was sampling
    res.cpu_http, res.cpu_model, res.cpu_clients = (http1 - http0) / wall, (model1 - model0) / wall, (client1 - client0) / wall
    return res


def request_body(args: argparse.Namespace) -> dict:
    return {"num_samples": 1, "steps": args.steps, "guidance_scale": args.guidance, "sampler": args.sampler,
            "format": "png"}


async def soak(server: Server, args: argparse.Namespace) -> dict:
    """`--soak-clients` closed-loop clients for `--soak-minutes`, RSS sampled every `--sample-every-s`."""
    duration_s = args.soak_minutes * 60
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while time.monotonic() - t0 < duration_s + args.warmup_s:
            rss = server.rss_mib()
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
            await asyncio.sleep(args.sample_every_s)

    task = asyncio.create_task(sampler())
    lat, statuses, errors, ok = await run_level(server.url, args.soak_clients, warmup_s=args.warmup_s,
                                                duration_s=duration_s, body_args=request_body(args),
                                                request_timeout_s=args.request_timeout_s, seed=7)
    task.cancel()
    measured = [rss for t, rss in samples if t >= args.warmup_s]
    tenth = max(1, len(measured) // 10)
    start, end = statistics.median(measured[:tenth]), statistics.median(measured[-tenth:])
    return {"minutes": args.soak_minutes, "clients": args.soak_clients, "ok": ok, "status_counts": statuses,
            "transport_errors": errors, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "rss_start_mib": start, "rss_end_mib": end, "rss_max_mib": max(measured),
            "growth_pct": (end - start) / start * 100, "rss_samples": samples}


# -----------------------------------------------------------------------------------------------
def markdown(levels: list[LevelResult], soak_result: Optional[dict], args: argparse.Namespace) -> str:
    lines = [f"Closed-loop clients on loopback, one image per request, {args.sampler} {args.steps} steps, guidance "
             f"{args.guidance:g}; {args.duration_s:g} s per level after {args.warmup_s:g} s of warm-up.", "",
             "| mode | precision | clients | img/s | p50 ms | p99 ms | p99/p50 | mean batch | 5xx | other non-200 | "
             "CPU cores: http / model / clients |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in levels:
        other = sum(n for c, n in r.status_counts.items() if c not in ("200",) and not c.startswith("5"))
        lines.append(f"| {r.mode} | {r.precision} | {r.clients} | {r.img_per_s:.2f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | "
                     f"{r.p99_ms / r.p50_ms if r.p50_ms else float('nan'):.2f} | {r.mean_batch:.1f} | "
                     f"{r.server_errors} | {other + r.transport_errors} | "
                     f"{r.cpu_http:.2f} / {r.cpu_model:.2f} / {r.cpu_clients:.2f} |")
    by = {(r.mode, r.clients): r for r in levels}
    lines.append("")
    for bm in [m for m in dict.fromkeys(r.mode for r in levels) if m.startswith("batched")]:
        for um in [m for m in dict.fromkeys(r.mode for r in levels) if m.startswith("unbatched")]:
            if (bm, 32) not in by or (um, 32) not in by:
                continue
            b, u = by[(bm, 32)], by[(um, 32)]
            ratio = b.img_per_s / u.img_per_s if u.img_per_s else float("inf")
            spread = b.p99_ms / b.p50_ms if b.p50_ms else float("nan")
            lines.append(f"- 32 clients: {bm} {b.img_per_s:.2f} img/s vs {um} {u.img_per_s:.2f} img/s = "
                         f"**{ratio:.1f}x** (target >= 4x: {'met' if ratio >= 4 else 'NOT met'}); {bm} p99/p50 = "
                         f"**{spread:.2f}** (target <= 3: {'met' if spread <= 3 else 'NOT met'})")
    errors = sum(r.server_errors for r in levels) + (sum(n for c, n in soak_result["status_counts"].items()
                                                         if c.startswith("5")) if soak_result else 0)
    lines.append(f"- 5xx answers over all runs: **{errors}** (target 0)")
    if soak_result:
        s = soak_result
        lines.append(f"- soak: {s['minutes']:g} min at {s['clients']} clients, {s['ok']} images, p50 {s['p50_ms']:.0f} "
                     f"ms, p99 {s['p99_ms']:.0f} ms; server RSS {s['rss_start_mib']:.0f} MiB -> {s['rss_end_mib']:.0f} "
                     f"MiB (max {s['rss_max_mib']:.0f}), growth **{s['growth_pct']:+.1f}%** (target < 5%: "
                     f"{'met' if s['growth_pct'] < 5 else 'NOT met'})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder to serve")
    p.add_argument("--levels", default="1,8,32,128", help="concurrent clients, comma-separated")
    p.add_argument("--modes", default="batched,unbatched", help="batched (max batch 64), unbatched (max batch 1), at --precision; "
                   "or with a precision of their own: batched-bf16, unbatched-fp32, ...; a -compiled suffix adds --compile "
                   "(batched-bf16-compiled)")
    p.add_argument("--duration-s", type=float, default=30.0, help="measured seconds per level")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each measurement")
    p.add_argument("--soak-minutes", type=float, default=0.0, help="soak length on the batched server (0 = none)")
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--sample-every-s", type=float, default=5.0, help="RSS sampling period in the soak")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.35)
    p.add_argument("--sampler", default="dpm++2m-sde")
    p.add_argument("--threads", type=int, help="torch threads in the server (default: torch's)")
    p.add_argument("--max-wait-ms", type=float, help="the batched servers' --max-wait-ms (default: 10, the server's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the servers' --precision "
                   "(the *-bf16 / *-fp32 modes set their own; auto: bf16 batched on bf16 hardware, fp32 unbatched)")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--out", help="write all results as JSON here")
    args = p.parse_args(argv)
    try:
        levels = [int(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        p.error(f"--levels {args.levels!r}: give integers like 1,8,32,128")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or any(n < 1 for n in levels) or args.duration_s <= 0:
        p.error(f"--modes: some of {', '.join(MODES)}; --levels >= 1; --duration-s > 0")

    results: list[LevelResult] = []
    soak_result = None
    with tempfile.TemporaryDirectory(prefix="ditkit-serve-load-") as tmp:
        for mode in modes:
            server = Server(args.ckpt, mode, args, Path(tmp))
            try:
                server.wait_ready(180)
                for n in levels:
                    r = measure(server, mode, n, args)
                    results.append(r)
                    print(f"{mode:9s} {n:4d} clients: {r.img_per_s:7.2f} img/s  p50 {r.p50_ms:7.0f} ms  "
                          f"p99 {r.p99_ms:7.0f} ms  batch {r.mean_batch:5.1f}  busy {100 * r.model_busy:3.0f}%  codes {r.status_counts}", flush=True)
                if mode.startswith("batched") and args.soak_minutes > 0 and soak_result is None:
                    print(f"soak: {args.soak_minutes:g} min at {args.soak_clients} clients ...", flush=True)
                    soak_result = asyncio.run(soak(server, args))
            finally:
                code = server.stop()
                if code not in (0, None):
                    print(f"warning: the {mode} server exited with {code}; log:\n"
                          f"{server.log_path.read_text()[-2000:]}", file=sys.stderr)
    table = markdown(results, soak_result, args)
    print()
    print(table)
    if args.out:
        payload = {"settings": vars(args), "levels": [asdict(r) for r in results], "soak": soak_result,
                   "markdown": table, "python": sys.version.split()[0], "cpus": os.cpu_count()}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
