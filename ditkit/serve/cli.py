"""`ditkit serve`: parse flags, load the model, run the server. No logic lives here."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
import sys
from typing import Callable

from ..errors import DitkitError, UsageError

API_KEYS_ENV = "DITKIT_API_KEYS"


def _int_in(name: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if not lo <= x <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in {lo}..{hi}, got {x}")
        return x
    return parse


def _number(name: str, lo: float, lo_open: bool = False) -> Callable[[str], float]:
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(x) or x < lo or (lo_open and x == lo):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo:g}, "
                                             f"got {v!r}")
        return x
    return parse


def register(sub, parser_class=None) -> None:
    """Add the `serve` subcommand to the main CLI's subparsers."""
    p = sub.add_parser("serve", help="serve a trained run over HTTP (FastAPI + uvicorn)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Serve a trained run (or an aMUSEd pipeline): POST /v1/generate, a playground "
                                   "page at /, probes /healthz and /readyz, Prometheus /metrics, API docs at /docs. "
                                   "SIGTERM drains.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="run folder (its latest checkpoint) or a checkpoint folder")
    what.add_argument("--amused", metavar="DIR", help="instead of a run: a saved diffusers AmusedPipeline folder "
                      "(text to image, loaded offline; see `ditkit amused`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=_int_in("--port", 0, 65535), default=8000, help="0 = any free port")
    p.add_argument("--max-batch-size", type=_int_in("--max-batch-size", 1, 4096), default=64,
                   help="images per model batch (1 = batching off)")
    p.add_argument("--max-wait-ms", type=_number("--max-wait-ms", 0), default=10.0,
                   help="how long the oldest waiting request waits for companions")
    p.add_argument("--max-queue", type=_int_in("--max-queue", 1, 1_000_000), default=256,
                   help="requests waiting for the model before new ones get 503")
    p.add_argument("--rate-limit", type=_number("--rate-limit", 0), default=10.0,
                   help="requests per second per client (API key, else IP address); 0 = off")
    p.add_argument("--burst", type=_int_in("--burst", 1, 1_000_000), default=5, help="token bucket size per client")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' on /v1/*; repeatable; "
                        f"${API_KEYS_ENV} (comma-separated) keeps keys off the command line")
    p.add_argument("--forwarded-allow-ips", default="", metavar="ADDRS",
                   help="comma-separated addresses or networks of reverse proxies whose X-Forwarded-For names "
                        "the client (rate limits, logs); * = any peer; default: none, the TCP peer is the client")
    p.add_argument("--max-header-bytes", type=_int_in("--max-header-bytes", 1024, 16 * 2**20), default=64 * 1024,
                   help="largest request line plus headers (431 beyond)")
    p.add_argument("--timeout-s", type=_number("--timeout-s", 0, lo_open=True), default=60.0,
                   help="per-request deadline (504 past it)")
    p.add_argument("--grace-s", type=_number("--grace-s", 0), default=30.0,
                   help="on SIGTERM: how long admitted requests get to finish")
    p.add_argument("--max-steps", type=_int_in("--max-steps", 1, 100_000), default=1000,
                   help="most sampler steps a request may ask for")
    from ..cli import _add_compile_flag, _add_precision_flag, _guidance_interval
    p.add_argument("--guidance-interval", type=_guidance_interval, default=None, metavar="LO,HI",
                   help="guide every request (classifier-free and autoguidance) only at noise levels sigma in "
                        "[LO, HI], e.g. 0.6,inf (default: every step)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    _add_precision_flag(p, auto=True)
    _add_compile_flag(p)
    from ..cli_args import add_quantize_flag
    add_quantize_flag(p)
    p.add_argument("--threads", type=_int_in("--threads", 1, 1024), help="CPU threads for torch (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no JSON log line per request")
    g = p.add_argument_group("Ray Serve (an optional extra: pip install 'ditkit[ray]'; docs/SCALING.md)")
    g.add_argument("--ray", action="store_true",
                   help="serve replicas of this app behind Ray's HTTP proxy: a local Ray, or the cluster at $RAY_ADDRESS")
    g.add_argument("--replicas", type=_int_in("--replicas", 1, 100_000), default=1,
                   help="replicas (with --autoscale: the initial count)")
    g.add_argument("--gpus-per-replica", type=_number("--gpus-per-replica", 0), default=0.0,
                   help="GPUs per replica; a fraction shares a GPU (0.5: two replicas per GPU)")
    g.add_argument("--autoscale", metavar="MIN,MAX",
                   help="scale between MIN and MAX replicas on the ongoing requests per replica")
    p.set_defaults(func=_cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a busy port is one clear error line (and port 0 works)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise UsageError(f"--host {host!r}: not an address to listen on ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise DitkitError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    return sock


def _checkpoint_only_flags(args) -> list[str]:
    """The flags given that only a ditkit checkpoint (--ckpt) can honour."""
    return [flag for flag, given in (("--ray", args.ray), ("--weights", args.weights != "ema"),
                                     ("--precision", args.precision not in ("auto", "fp32")),
                                     ("--compile", args.compile), ("--quantize", args.quantize != "none"),
                                     ("--guidance-interval", args.guidance_interval is not None)) if given]


def _cmd_serve(args) -> int:
    from .app import ServeSettings, create_app, make_server

    if args.amused is not None:
        from ..amused import check_model_dir

        flags = _checkpoint_only_flags(args)
        if flags:
            raise UsageError(f"--amused: {', '.join(flags)} apply to a ditkit checkpoint (--ckpt), not to an "
                             "aMUSEd pipeline")
        check_model_dir(args.amused, flag="--amused")  # before any thread starts: one line, no traceback

    keys = tuple(args.api_key or ()) + tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")
                                              if k.strip())
    settings = ServeSettings(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, rate_limit=args.rate_limit,
                             burst=args.burst, api_keys=keys, timeout_s=args.timeout_s, grace_s=args.grace_s,
                             max_steps=args.max_steps, weights=args.weights, device=args.device,
                             precision=args.precision, compile=args.compile, quantize=args.quantize,
                             guidance_interval=args.guidance_interval,
                             forwarded_allow_ips=args.forwarded_allow_ips, max_header_bytes=args.max_header_bytes)
    settings.validate()
    if args.ray:  # the replicas load the model; this process only starts Ray and waits
        from .ray_app import parse_autoscale, run_ray

        return run_ray(args.ckpt, settings, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                       autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
                       host=args.host, port=args.port, threads=args.threads)
    if args.replicas != 1 or args.gpus_per_replica or args.autoscale:
        raise UsageError("--replicas, --gpus-per-replica and --autoscale need --ray")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    from .batcher import model_thread

    worker = model_thread()  # the model loads on the thread that will run its batches: one OpenMP team
    if args.amused is not None:
        from ..amused import load_amused_model

        model = worker.submit(load_amused_model, args.amused, settings.device, "--amused").result()
    else:
        model = worker.submit(settings.load, args.ckpt).result()
    app = create_app(model=model, settings=settings, executor=worker)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(args.host) and not keys:
        print(f"ditkit serve: warning: listening on {args.host} without an API key: anyone who can reach it can "
              "use it (give --api-key)", file=sys.stderr)
    step = f" step {model.step}" if model.checkpoint is not None else ""  # a pipeline has no training step
    print(f"ditkit serve: {model.config.get('model_name', 'model')}{step} on http://{shown}:{port} "
          f"(playground /, API docs /docs; batching up to {settings.max_batch_size} images)", file=sys.stderr,
          flush=True)
    server = make_server(app, log_level=args.log_level, access_log=args.access_log)
    server.run(sockets=[sock])
    return 0
