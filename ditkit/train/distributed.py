"""Data-parallel context. Single process by default; `torchrun` sets RANK/WORLD_SIZE and the loop runs
under torch.distributed with DDP (gloo on CPU, nccl on GPU).

How the loop uses it (ditkit/train/loop.py): every rank draws the *global* batch's randomness and data
permutation from the same seeded generators and keeps its slice `lo:hi` (the distributed sampler, seeded
per epoch), DDP averages the gradients, so every rank takes the same AdamW step and keeps the same EMA;
only rank 0 writes. `finish()` proves the "same" at the end (a digest of every rank's weights) and leaves
the process group.

Never a hang: every collective has a deadline (`DITKIT_DIST_TIMEOUT_S`, default 600 s), and a collective
that fails because a peer died becomes one `DitkitError` line naming the rank, instead of a gloo traceback.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from ..errors import DitkitError, UsageError
from ..utils import first_line

log = logging.getLogger(__name__)

TIMEOUT_ENV = "DITKIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # a rank-0-only sample grid of a large model must fit inside one collective's wait
DUMP_ENV = "DITKIT_DDP_DUMP_DIR"  # debug/tests: each rank writes rank{R}.json with its weights' digests


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DitkitError(f"WORLD_SIZE is set but {name} is not: start ditkit with torchrun "
                              "(torchrun --nproc_per_node=N -m ditkit train ...)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DitkitError(f"{name}={raw!r} in the environment: must be an integer") from None


def timeout_s_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0")
    return value


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and the exact bytes of every tensor: equal digests mean
    bitwise-equal weights (used to prove that all ranks hold the same model and EMA)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = ""  # "gloo" | "nccl" when distributed
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "DistContext":
        ws = _env_int("WORLD_SIZE", 1)
        if ws <= 1:
            return DistContext()
        import torch.distributed as tdist

        rank, local = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise DitkitError(f"WORLD_SIZE={ws} but {' and '.join(missing)} not set: start ditkit with torchrun "
                              "(torchrun --nproc_per_node=N -m ditkit train ...)")
        timeout_s = timeout_s_from_env()
        if torch.cuda.is_available():
            n_gpus = torch.cuda.device_count()
            if local >= n_gpus:
                raise UsageError(f"LOCAL_RANK {local}: this node has {n_gpus} GPU(s); start at most one process "
                                 f"per GPU (torchrun --nproc_per_node={n_gpus})")
            torch.cuda.set_device(local)
            dev, backend = torch.device("cuda", local), "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
            cores = os.cpu_count() or 1
            if rank == 0 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > cores:
                log.warning("%s processes on a node with %d CPU cores: they will compete for cores",
                            os.environ.get("LOCAL_WORLD_SIZE"), cores)
        owns = False
        if not tdist.is_initialized():
            try:
                tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as e:
                raise DitkitError(f"rank {rank}: could not join the {ws}-process group at "
                                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
                                  f"({first_line(e)}); are all nodes started with the same --nnodes and "
                                  "--rdzv-endpoint?") from None
            owns = True
        else:  # the caller set the group up (e.g. a launcher of its own): use it as it is, leave it open
            backend = str(tdist.get_backend())
        return DistContext(rank, ws, local, dev, timeout_s, backend, owns)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around `model` (the same object; DDP broadcasts rank 0's weights once, here)."""
        if self.world_size <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers are only re-broadcast every forward when they change in training (BatchNorm's running
        # statistics); the DiT's buffers are fixed tables, synced once at construction.
        running_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"  # renamed in torch 2.13
        # A 1-channel patch embedding's weight gradient (O, 1, p, p) comes back with stride 1 on the size-1
        # channel axis: the same memory order as the bucket's, but DDP's layout check warns on every rank.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        with self.collective("wrapping the model in DDP"):
            # gradient_as_bucket_view: gradients live in the all-reduce buckets, no extra copy per step
            return DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                       gradient_as_bucket_view=True, **{sync_kw: running_stats})

    def barrier(self) -> None:
        if self.world_size <= 1:
            return
        import torch.distributed as tdist

        with self.collective("a barrier"):
            if self.backend == "gloo":  # names the ranks that did not arrive, instead of a bare timeout
                tdist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            else:
                tdist.barrier()

    def agree(self, value: int) -> int:
        """Rank 0's value of an integer, on every rank: a decision read from a clock must be one decision."""
        if self.world_size <= 1:
            return int(value)
        import torch.distributed as tdist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device if self.backend == "nccl" else "cpu")
        with self.collective("agreeing on the planned step count"):
            tdist.broadcast(t, src=0)
        return int(t.item())

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (for logging)."""
        if self.world_size > 1:
            import torch.distributed as tdist
            value = value.detach().clone()
            with self.collective("averaging the loss"):
                tdist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def check_synced(self, **modules: nn.Module) -> dict[str, str]:
        """The digest of each module's weights; under DDP, raises if any rank's differ from rank 0's.
        Cheap (one all-gather of 32 bytes per module): safe to call at every checkpoint."""
        digests = {name: state_digest(m.state_dict()) for name, m in modules.items()}
        if self.world_size <= 1:
            return digests
        import torch.distributed as tdist

        mine = torch.tensor([list(bytes.fromhex(digests[n])) for n in sorted(digests)], dtype=torch.int64,
                            device=self.device if self.backend == "nccl" else "cpu")
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self.collective("comparing weights across ranks"):
            tdist.all_gather(gathered, mine)
        diverged = sorted({name for r, g in enumerate(gathered) for i, name in enumerate(sorted(digests))
                           if not torch.equal(g[i], gathered[0][i])})
        if diverged:
            ranks = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
            raise DitkitError(f"the weights of {', '.join(diverged)} differ between rank 0 and rank(s) "
                              f"{', '.join(map(str, ranks))}: data-parallel training lost its consistency")
        return digests

    def finish(self, **modules: nn.Module) -> None:
        """End of a run: check every rank holds the same weights (e.g. model=..., ema=...), write the
        debug dump when $DITKIT_DDP_DUMP_DIR is set, then leave the process group."""
        digests = self.check_synced(**modules)
        dump = os.environ.get(DUMP_ENV)
        if dump:
            from ..utils import atomic_write_json

            Path(dump).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(dump) / f"rank{self.rank}.json",
                              {"rank": self.rank, "world_size": self.world_size, "digests": digests})
        self.close()

    def close(self) -> None:
        """Destroy the process group we created (idempotent; a no-op in a single process). The caller drops
        its DDP wrapper first: the collection below frees it (a reference cycle) while the group still
        lives, so the group's C++ teardown runs now and not in the interpreter's exit, where it can abort."""
        if self.owns_group:
            import gc

            import torch.distributed as tdist

            gc.collect()
            if tdist.is_initialized():
                tdist.destroy_process_group()
            self.owns_group = False

    def collective(self, what: str) -> "_Collective":
        """A context for code that runs collectives (e.g. `loss.backward()` under DDP): a peer's death
        or a deadline passed becomes one DitkitError line naming this rank and `what`."""
        return _Collective(self, what)


class _Collective:
    """Turns a collective that failed (a peer died: gloo's "Connection closed by peer", or the deadline
    passed) into one clear DitkitError line."""

    def __init__(self, ctx: DistContext, what: str):
        self.ctx, self.what = ctx, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or self.ctx.world_size <= 1 or not _is_communication_error(exc):
            return False  # anything else (a shape error, an OOM) keeps its own traceback
        ctx = self.ctx
        raise DitkitError(f"rank {ctx.rank}/{ctx.world_size}: {self.what} failed ({first_line(exc)}). Another "
                          f"process probably died or stalled for over {ctx.timeout_s:g} s ({TIMEOUT_ENV}); see its "
                          "log, then continue with --resume from the last checkpoint") from None


# gloo raises plain RuntimeErrors ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer",
# "Timed out waiting 5000ms for recv operation"); newer code paths raise torch.distributed.DistError.
_COMM_MARKERS = ("gloo", "nccl", "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                 "ProcessGroup")


def _is_communication_error(exc: BaseException) -> bool:
    if isinstance(exc, DitkitError) or not isinstance(exc, RuntimeError):
        return False
    import torch.distributed as tdist

    dist_error = getattr(tdist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(m in text for m in _COMM_MARKERS)

