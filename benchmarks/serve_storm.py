"""A retry storm against `ditkit serve` on loopback: does refusing cost the server its throughput?

    flock /tmp/ditkit-cpu.lock python benchmarks/serve_storm.py --ckpt runs/mnist --rounds 3 --duration-s 8

The script starts its own server (`python -m ditkit serve --max-queue 8 --rate-limit 0`, no access log)
on a free 127.0.0.1 port and runs two closed loops of clients against it, taking turns `--rounds` times
(so that load from other processes on a shared machine falls on both alike), each turn `--duration-s`
after a short warm-up:

- polite: `--polite-clients` (16) clients; a refused client (503) sleeps its Retry-After, then retries;
- storm: `--storm-clients` (64) clients that ignore Retry-After and retry the moment they are refused.

Every client sends one-image requests (`--steps` steps, a random digit and seed) over one keep-alive
connection, through a raw asyncio HTTP/1.1 client (pre-built request bytes, minimal parsing), so the
load generator itself takes little of the CPU the server shares it with. Reported: successful requests
a second in each loop (over all its turns), refusals a second, and the ratio storm / polite (issue 51
asks >= 0.8).

`--server-path DIR` runs the server from another source tree (e.g. an older checkout) for a before /
after comparison. Bounded: 2 x `--rounds` turns of `--duration-s` plus warm-ups and the server's start;
loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from serverproc import HOST, free_port, stop  # benchmarks/serverproc.py


def tiny_run(out: Path) -> Path:
    """A throwaway DiT-T/4 run (40 steps; the test suite's fixture) when no --ckpt is given."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    cfg = TrainConfig(out=str(out), model="DiT-T/4", objective="linear", batch_size=16, max_steps=40,
                      warmup_steps=10, log_every=20, ckpt_every=40, sample_every=0, sample_steps=2,
                      progress=False, subset=2000)
    return Path(train(cfg))


def start_server(ckpt: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.server_path:
        env["PYTHONPATH"] = str(Path(args.server_path).resolve())
    cmd = [sys.executable, "-m", "ditkit", "serve", "--ckpt", str(ckpt), "--port", str(port),
           "--max-queue", str(args.max_queue), "--rate-limit", "0", "--no-access-log", "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=args.server_path or None)


async def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            status, _, _ = await request_once(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def request_once(port: int, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


def generate_request(steps: int, rng: random.Random) -> bytes:
    body = json.dumps({"labels": [rng.randrange(10)], "seed": rng.randrange(2**31), "steps": steps}).encode()
    return (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def client(port: int, polite: bool, steps: int, seed: int, stop_at: float, count_from: float,
                 tally: dict[str, int]) -> None:
    """One closed-loop client on one keep-alive connection (reconnecting if the server closes it)."""
    rng = random.Random(seed)
    reader: Optional[asyncio.StreamReader] = None
    writer = None
    while time.monotonic() < stop_at:
        fresh = writer is None
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(generate_request(steps, rng))
            status, headers, _ = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError):
            # A keep-alive connection the server closed while the client slept (uvicorn closes idle ones
            # after 5 s; a Retry-After can be longer): reconnect and resend, as HTTP clients do. Only a
            # failure on a fresh connection is an error.
            if fresh:
                tally["transport_errors"] = tally.get("transport_errors", 0) + (time.monotonic() >= count_from)
                await asyncio.sleep(0.01)
            writer = None
            continue
        now = time.monotonic()
        if count_from <= now < stop_at:
            tally[str(status)] = tally.get(str(status), 0) + 1
        if headers.get(b"connection") == b"close":
            writer.close()
            writer = None
        if status != 200 and polite:
            await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
    if writer is not None:
        writer.close()


async def run_loop(port: int, clients: int, polite: bool, args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    count_from = t0 + args.warmup_s
    stop_at = count_from + args.duration_s
    tally: dict[str, int] = {}
    await asyncio.gather(*(client(port, polite, args.steps, 1000 * clients + i, stop_at, count_from, tally)
                           for i in range(clients)))
    return {"clients": clients, "polite": polite, "seconds": args.duration_s, "status_counts": tally}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main_async(args: argparse.Namespace, ckpt: Path) -> dict:
    port = free_port()
    proc = start_server(ckpt, port, args)
    try:
        await wait_ready(port, proc)
        results: dict[str, dict] = {}
        for turn in range(args.rounds):
            for name, clients, polite in (("polite", args.polite_clients, True),
                                          ("storm", args.storm_clients, False)):
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                r = await run_loop(port, clients, polite, args)
                r["server_cpu_s"], r["wall_s"] = cpu_seconds(proc.pid) - c0, time.monotonic() - t0
                print(f"turn {turn} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
                total = results.setdefault(name, {"clients": clients, "polite": polite, "seconds": 0.0,
                                                  "status_counts": {}, "server_cpu_s": 0.0, "wall_s": 0.0})
                total["seconds"] += r["seconds"]
                total["server_cpu_s"] += r["server_cpu_s"]
                total["wall_s"] += r["wall_s"]  # the turn's end waits for the answers in flight
                for code, n in r["status_counts"].items():
                    total["status_counts"][code] = total["status_counts"].get(code, 0) + n
        for total in results.values():
            counts, seconds = total["status_counts"], total["seconds"]
            total["ok_per_s"] = counts.get("200", 0) / seconds
            total["refused_per_s"] = sum(n for code, n in counts.items() if code in ("429", "503")) / seconds
            total["server_errors"] = sum(n for code, n in counts.items() if code.startswith("5") and code != "503")
            total["server_cpu_cores"] = total["server_cpu_s"] / total["wall_s"]
        return results
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a run folder (default: train a 40-step DiT-T/4 run in a temporary folder)")
    p.add_argument("--polite-clients", type=int, default=16)
    p.add_argument("--storm-clients", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="sampler steps per request")
    p.add_argument("--duration-s", type=float, default=8.0, help="measured seconds of each turn")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each turn")
    p.add_argument("--rounds", type=int, default=3, help="turns of each loop, alternating")
    p.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    p.add_argument("--server-path", help="run the server from this source tree (a before/after comparison)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if not (1 <= args.duration_s <= 300 and 1 <= args.rounds <= 20 and 1 <= args.polite_clients <= 1024
            and 1 <= args.storm_clients <= 1024):
        p.error("--duration-s must be in 1..300, --rounds in 1..20 and the client counts in 1..1024")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else tiny_run(Path(tmp) / "tiny")
        results = asyncio.run(main_async(args, ckpt))
    ratio = results["storm"]["ok_per_s"] / max(results["polite"]["ok_per_s"], 1e-9)
    results["ratio"] = ratio
    print("| loop | clients | ok/s | refused/s | 5xx other than 503 | server CPU (cores) |")
    print("|---|---|---|---|---|---|")
    for name in ("polite", "storm"):
        r = results[name]
        print(f"| {name} | {r['clients']} | {r['ok_per_s']:.1f} | {r['refused_per_s']:.1f} | {r['server_errors']} | "
              f"{r['server_cpu_cores']:.2f} |")
    print(f"storm / polite successful throughput: {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
