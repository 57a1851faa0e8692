"""A server process for the serving benchmarks (ray_serve.py, serve_fuzz.py, serve_storm.py): a free port on
loopback, waiting for /readyz, and stopping it.

    port = free_port()
    proc = subprocess.Popen([... "ditkit", "serve", "--port", str(port) ...])
    try:
        wait_ready(f"http://{HOST}:{port}", 120, proc)
        ...
    finally:
        stop(proc)
"""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Optional

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, proc: Optional[subprocess.Popen] = None) -> None:
    """Until GET url/readyz answers 200; SystemExit when `proc` exits first (with its stderr's tail, where it
    was piped) or after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = proc.stderr.read()[-2000:] if proc.stderr is not None else ""
            raise SystemExit(f"the server exited with {proc.returncode}" + (f": {tail}" if tail else ""))
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} was not ready within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
