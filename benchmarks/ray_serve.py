"""Serving throughput through Ray Serve with 1 and 2 replicas, and Ray's overhead against plain
`ditkit serve` at the same load (issue 7's figures).

    python benchmarks/ray_serve.py --ckpt runs/mnist [--clients 1,16] [--duration-s 20] [--steps 20]

Configurations, each measured at every client level:

    plain      `python -m ditkit serve --threads 1` (uvicorn, one process)          the reference
    ray-1      Ray Serve, 1 replica (1 CPU, 1 torch thread), the same app inside     Ray's overhead
    ray-2      Ray Serve, 2 replicas (1 CPU, 1 thread each)                          scale-out
    plain-2t   `ditkit serve --threads 2` (one process using both cores)             for comparison

Closed-loop clients on 127.0.0.1 only: each sends one request (one image, `--steps` steps of the default
sampler, a random digit and seed, PNG), waits for the answer and sends the next. Per level: `--warmup-s`,
then `--duration-s` of measurement; throughput counts the 200s that arrive inside the window. Rate
limiting is off and queues are deep, so every configuration sees the same offered load.

Prints a markdown table for docs/BENCHMARKS.md. Bounded: every wait has a timeout; Ray is started once
(local, no dashboard) and shut down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serverproc import HOST, free_port, stop, wait_ready  # benchmarks/serverproc.py

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def load(url: str, clients: int, args: argparse.Namespace) -> dict:
    rng = random.Random(clients)
    t0 = time.monotonic()
    window = (t0 + args.warmup_s, t0 + args.warmup_s + args.duration_s)
    lat: list[float] = []
    codes: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.request_timeout_s) as http:
        async def client() -> None:
            while time.monotonic() < window[1]:
                body = {"labels": [rng.randrange(10)], "seed": rng.randrange(2**31), "steps": args.steps,
                        "format": "png"}
                t = time.monotonic()
                try:
                    code = str((await http.post("/v1/generate", json=body)).status_code)
                except httpx.HTTPError:
                    code = "transport"
                done = time.monotonic()
                if window[0] <= done <= window[1]:
                    codes[code] = codes.get(code, 0) + 1
                    if code == "200":
                        lat.append((done - t) * 1000)

        await asyncio.gather(*(client() for _ in range(clients)))
    ok = codes.get("200", 0)
    return {"clients": clients, "img_per_s": ok / args.duration_s, "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99), "codes": codes}


def measure(name: str, url: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for clients in args.clients:
        r = asyncio.run(load(url, clients, args))
        r["config"] = name
        rows.append(r)
        print(f"{name:9s} {clients:3d} clients: {r['img_per_s']:6.1f} img/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  {r['codes']}", file=sys.stderr, flush=True)
    return rows


def plain(ckpt: str, threads: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ditkit", "serve", "--ckpt", ckpt, "--host", HOST, "--port", str(port),
           "--threads", str(threads), "--rate-limit", "0", "--max-queue", "100000",
           "--max-batch-size", str(args.max_batch_size), "--timeout-s", str(args.request_timeout_s),
           "--grace-s", "5", "--no-access-log", "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    wait_ready(url, args.start_timeout_s, proc)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a run folder made by `ditkit train` (e.g. DiT-T/4 on MNIST)")
    ap.add_argument("--clients", default="1,16", help="closed-loop client counts")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--request-timeout-s", type=float, default=60.0)
    ap.add_argument("--start-timeout-s", type=float, default=180.0)
    ap.add_argument("--configs", default="plain,ray-1,ray-2,plain-2t")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    configs = args.configs.split(",")
    rows: list[dict] = []

    for name in [c for c in configs if c.startswith("plain")]:
        proc, url = plain(args.ckpt, 2 if name == "plain-2t" else 1, args)
        try:
            rows += measure(name, url, args)
        finally:
            stop(proc)

    ray_configs = [c for c in configs if c.startswith("ray-")]
    if ray_configs:
        os.environ.setdefault("PYTHONPATH", str(ROOT))  # the replicas import this checkout's ditkit
        from ditkit.serve.app import ServeSettings
        from ditkit.serve.ray_app import ReplicaPlan, start_ray, stop_ray

        settings = ServeSettings(rate_limit=0, max_queue=100000, max_batch_size=args.max_batch_size,
                                 timeout_s=args.request_timeout_s, grace_s=5)
        port = free_port()
        try:
            for name in ray_configs:
                n = int(name.split("-")[1])
                url = start_ray(args.ckpt, settings, ReplicaPlan(replicas=n), host=HOST, port=port, threads=1,
                                quiet=True)  # the first call starts Ray; later ones redeploy with n replicas
                wait_ready(url, args.start_timeout_s)
                _wait_replicas(n, args.start_timeout_s)
                rows += measure(name, url, args)
        finally:
            stop_ray()

    print(f"\n{os.cpu_count()} CPU cores; 1 image per request, {args.steps} steps, PNG; closed-loop clients on "
          f"127.0.0.1; {args.duration_s:g} s per level after {args.warmup_s:g} s warm-up\n")
    print("| config | clients | img/s | p50 ms | p99 ms | non-200 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        bad = sum(n for c, n in r["codes"].items() if c != "200")
        print(f"| {r['config']} | {r['clients']} | {r['img_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {bad} |")
    by = {(r["config"], r["clients"]): r for r in rows}
    for clients in args.clients:
        p, r1, r2 = by.get(("plain", clients)), by.get(("ray-1", clients)), by.get(("ray-2", clients))
        if p and r1 and r1["img_per_s"] and p["img_per_s"]:
            print(f"\n{clients} client(s): Ray, 1 replica, against plain `ditkit serve`: "
                  f"{r1['img_per_s'] / p['img_per_s']:.2f}x the throughput, p50 {r1['p50_ms'] - p['p50_ms']:+.1f} ms")
        if r1 and r2 and r1["img_per_s"]:
            print(f"{clients} client(s): 2 replicas vs 1: {r2['img_per_s'] / r1['img_per_s']:.2f}x throughput")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=2))


def _wait_replicas(n: int, timeout_s: float) -> None:
    from ray import serve

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        app = serve.status().applications.get("ditkit")
        if app is not None and app.deployments["ditkit"].replica_states.get("RUNNING", 0) == n \
                and sum(app.deployments["ditkit"].replica_states.values()) == n:
            return
        time.sleep(0.5)
    raise SystemExit(f"Ray did not reach {n} running replicas within {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
