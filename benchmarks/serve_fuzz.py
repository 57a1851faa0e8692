"""A time-boxed schemathesis run against `ditkit serve` on loopback: how many answers are server errors?

    flock /tmp/ditkit-cpu.lock python benchmarks/serve_fuzz.py --ckpt runs/mnist --max-time-s 180

Starts `python -m ditkit serve` (rate limiting off, at most `--max-steps` steps a request, so valid
requests stay cheap) on a free 127.0.0.1 port, runs `st run` over every operation of its /openapi.json
(all generation modes and phases, schemathesis' conformance checks) for `--max-time-s`, and counts the
answers by status code from schemathesis' NDJSON event log. Prints the counts and the number of
answers >= 500 (the figure issue 51 asks to be 0). Loopback only; bounded by --max-time-s plus the start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from serverproc import HOST, free_port, stop, wait_ready  # benchmarks/serverproc.py

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")


def status_counts(ndjson: Path) -> Counter:
    """Status codes of every response schemathesis recorded (its NDJSON events hold them as
    "status_code" inside each interaction's response)."""
    counts: Counter = Counter()

    def walk(node) -> None:
        if isinstance(node, dict):
            response = node.get("response")
            if isinstance(response, dict) and isinstance(response.get("status_code"), int):
                counts[response["status_code"]] += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for line in ndjson.read_text().splitlines():
        if line.strip():
            walk(json.loads(line))
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run folder")
    p.add_argument("--max-time-s", type=int, default=180)
    p.add_argument("--max-steps", type=int, default=4, help="the server's --max-steps")
    p.add_argument("--out", help="write the counts as JSON here")
    args = p.parse_args()
    if not 10 <= args.max_time_s <= 900:
        p.error("--max-time-s must be in 10..900")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ditkit", "serve", "--ckpt", args.ckpt, "--port", str(port),
                               "--rate-limit", "0", "--max-steps", str(args.max_steps), "--no-access-log",
                               "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, 120, server)
        with tempfile.TemporaryDirectory() as tmp:
            events = Path(tmp) / "events.ndjson"
            st = Path(sys.executable).with_name("st")
            cmd = [str(st), "run", url + "/openapi.json", "--max-time", str(args.max_time_s), "--checks", CHECKS,
                   "--continue-on-failure", "--generation-deterministic", "--report", "ndjson",
                   "--report-ndjson-path", str(events)]
            t0 = time.monotonic()
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_time_s + 300)
            seconds = time.monotonic() - t0
            counts = status_counts(events) if events.exists() else Counter()
    finally:
        stop(server)
    summary = run.stdout.strip().splitlines()[-25:]
    server_errors = sum(n for code, n in counts.items() if code >= 500)
    result = {"seconds": round(seconds, 1), "responses": sum(counts.values()),
              "status_counts": {str(k): v for k, v in sorted(counts.items())}, "server_errors": server_errors,
              "st_exit_code": run.returncode}
    print("\n".join(summary))
    print(json.dumps(result))
    print(f"{result['responses']} responses in {seconds:.0f} s, {server_errors} with status >= 500")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
