"""Data-parallel training under torchrun (2 gloo processes on this CPU).

- 2 processes end with bitwise-identical model and EMA on both ranks, equal to the checkpoint rank 0 wrote,
  and match a 1-process run with the same global batch to fp32 tolerance (weights and per-step losses);
- resume under DDP: 2 processes to step 4, resumed to 6, equals an uninterrupted 2-process run of 6 steps;
- a world-size change on resume is refused with one clear line (both ways);
- a rank killed mid-run ends the whole job quickly (no hang) and leaves a loadable checkpoint.

Runs are launched as subprocesses (`python -m torch.distributed.run --standalone ...`, a free port each);
the independent ones run concurrently to keep this file well under two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

from ditkit.runs import latest_checkpoint, load_weights
from ditkit.train.distributed import DUMP_ENV, TIMEOUT_ENV, DistContext, state_digest

from conftest import SMALL_SHAPE_ARGS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="this torch build has no torch.distributed gloo backend"),
]

ROOT = Path(__file__).resolve().parents[1]
# The same settings for every run; only --max-steps (a resumable setting) and --out vary. The final sample
# grid is kept cheap (1 Euler step), so the runs measure training, not sampling. No lr decay: extending a
# run from 4 to 6 steps would move the decay's start, and the resume test compares with a 6-step run.
# fp32: one process and two must agree to 1e-5, and bf16 GEMMs round differently on half batches.
TRAIN_ARGS = ["--subset", "512", "--batch-size", "16", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "0",
              "--lr-decay", "0", "--precision", "fp32",
              "--no-progress", "--threads", "1", "--sample-sampler", "euler", "--sample-steps", "1",
              *SMALL_SHAPE_ARGS]
RUN_TIMEOUT_S = 180  # a bound per subprocess, far above the ~20 s a run takes: a hang fails the test
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _env(dump: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != DUMP_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    env[TIMEOUT_ENV] = "60"
    if dump is not None:
        env[DUMP_ENV] = str(dump)
    return env


def _cmd(out: Path, steps: int, nproc: int, resume: bool) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return launcher + ["-m", "ditkit", "train", *TRAIN_ARGS, "--max-steps", str(steps), "--out", str(out)] \
        + (["--resume"] if resume else [])


def _start(out: Path, steps: int, nproc: int, resume: bool = False, dump: Path | None = None) -> subprocess.Popen:
    # a session of its own, so a test that fails can end the launcher and all its ranks together
    return subprocess.Popen(_cmd(out, steps, nproc, resume), cwd=ROOT, env=_env(dump), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(p: subprocess.Popen, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{' '.join(p.args)} did not finish within {timeout_s} s")
    return p.returncode, out + err


def _run_ok(*procs: subprocess.Popen) -> None:
    for p in procs:
        rc, log = _finish(p)
        assert rc == 0, f"{' '.join(p.args)} failed ({rc}):\n{log[-3000:]}"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """single: 1 process, 6 steps; ddp: 2 processes, 6 steps (with the per-rank digest dump);
    part: 2 processes, 4 steps, then resumed to 6; and, meanwhile, the two world-size-change resumes."""
    root = tmp_path_factory.mktemp("ddp")
    r: dict = {"single": root / "single", "ddp": root / "ddp", "part": root / "part", "dump": root / "dump"}
    _run_ok(_start(r["single"], 6, 1), _start(r["ddp"], 6, 2, dump=r["dump"]), _start(r["part"], 4, 2))
    resume = _start(r["part"], 6, 2, resume=True)
    ws_2_to_1 = _start(r["ddp"], 8, 1, resume=True)  # a 2-process run resumed by 1 process
    ws_1_to_2 = _start(r["single"], 8, 2, resume=True)  # and the other way round
    r["ws_2_to_1"], r["ws_1_to_2"] = _finish(ws_2_to_1, 90), _finish(ws_1_to_2, 120)
    _run_ok(resume)
    return r


def test_ranks_hold_identical_weights_and_ema(runs):
    dumps = {int(p.stem[4:]): json.loads(p.read_text()) for p in runs["dump"].glob("rank*.json")}
    assert sorted(dumps) == [0, 1], "each rank writes its digests in DistContext.finish (called by the loop)"
    assert dumps[0]["digests"] == dumps[1]["digests"]
    assert set(dumps[0]["digests"]) == {"model", "ema"}
    ckpt = latest_checkpoint(runs["ddp"])
    assert ckpt.name == "step_0000006"
    # what rank 0 saved is bit for bit what rank 1 holds
    for kind in ("model", "ema"):
        assert state_digest(load_weights(ckpt, kind)) == dumps[1]["digests"][kind], kind


def test_two_processes_match_one_with_the_same_global_batch(runs):
    single, ddp = latest_checkpoint(runs["single"]), latest_checkpoint(runs["ddp"])
    for kind in ("model", "ema"):
        a, b = load_weights(single, kind), load_weights(ddp, kind)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-5, f"{kind}: the weights differ by up to {worst:.2e}"
    m1, m2 = _metrics(runs["single"]), _metrics(runs["ddp"])
    assert [r["step"] for r in m2] == list(range(1, 7))  # only rank 0 logs: one line per step
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5), r1["step"]
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5), r1["step"]
        assert r2["lr"] == r1["lr"] and r2["epoch"] == r1["epoch"]
    cfg = json.loads((runs["ddp"] / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["batch_size"] == 16  # the global batch
    assert (runs["ddp"] / "samples" / "step_0000006.png").exists()


def test_resume_under_ddp_equals_an_uninterrupted_run(runs):
    part, full = runs["part"], runs["ddp"]
    assert [(r["step"], r["loss"]) for r in _metrics(part)] == [(r["step"], r["loss"]) for r in _metrics(full)]
    for kind in ("model", "ema"):
        a, b = load_weights(latest_checkpoint(full), kind), load_weights(latest_checkpoint(part), kind)
        assert state_digest(a) == state_digest(b), kind  # bit-exact on CPU


def test_world_size_change_on_resume_is_refused(runs):
    # a 2-process run resumed by 1 process, and a 1-process run resumed by 2: one clear line, no hang
    (rc1, log1), (rc2, log2) = runs["ws_2_to_1"], runs["ws_1_to_2"]
    assert rc1 == 2, log1
    assert "ditkit train: error: --resume: the run was written by 2 process(es), now 1" in log1
    assert "Traceback" not in log1
    assert rc2 != 0, log2
    assert "ditkit train: error: --resume: the run was written by 1 process(es), now 2" in log2
    # nothing was written: both runs still end at step 6
    assert latest_checkpoint(runs["ddp"]).name == latest_checkpoint(runs["single"]).name == "step_0000006"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks' processes through /proc")
def test_a_rank_that_dies_ends_the_job_without_a_hang(tmp_path):
    out = tmp_path / "dies"
    args = _cmd(out, 100_000, 2, False)
    args[args.index("--ckpt-every") + 1] = "2"
    p = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and p.poll() is None:
            if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[0][-3000:]
        ranks = {_rank_of(c): c for c in _children(p.pid)}
        assert 1 in ranks, f"no rank-1 worker among the launcher's children: {ranks}"
        os.kill(ranks[1], signal.SIGKILL)
        t_kill = time.monotonic()
        log = p.communicate(timeout=90)[0]
        ended_s = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode != 0
    assert ended_s < 60, f"the job took {ended_s:.0f} s to end after a rank died"
    assert "rank      : 1" in log and "SIGKILL" in log, log[-3000:]  # torchrun names the rank that died
    # whatever step it reached, the last checkpoint is whole and loads
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name.split("_")[1]) >= 2
    assert load_weights(ckpt, "model") and load_weights(ckpt, "ema")


def test_single_process_context_needs_no_process_group():
    ctx = DistContext.from_env() if "WORLD_SIZE" not in os.environ else DistContext()
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    net = torch.nn.Linear(3, 2)
    assert ctx.wrap(net) is net
    assert ctx.mean(torch.tensor(2.5)) == 2.5
    digests = ctx.check_synced(model=net)
    assert digests["model"] == state_digest(net.state_dict())
    ctx.barrier()
    ctx.close()


def test_bad_launch_environment_is_one_clear_error(monkeypatch):
    from ditkit.errors import DitkitError, UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DitkitError, match="MASTER_ADDR and MASTER_PORT not set: start ditkit with torchrun"):
        DistContext.from_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match=TIMEOUT_ENV):
        DistContext.from_env()


def test_a_rank_that_never_arrives_times_out_with_a_clear_error(monkeypatch):
    import socket

    from ditkit.errors import DitkitError

    with socket.socket() as s:  # a free port on loopback for rank 0's store; rank 1 never comes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     **{TIMEOUT_ENV: "2"}).items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(DitkitError, match=r"rank 0: could not join the 2-process group at 127\.0\.0\.1:\d+ within 2 s"):
        DistContext.from_env()
    assert time.monotonic() - t0 < 30
    assert not torch.distributed.is_initialized()


def test_time_limited_ddp_run_ends_on_one_agreed_step(tmp_path):
    """--max-minutes under DDP: rank 0's plan and clock are every rank's, so no rank stops while another waits."""
    out = tmp_path / "timed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditkit",
           "train", *TRAIN_ARGS, "--lr-decay", "0.3", "--max-minutes", "0.15", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    rc, log = _finish(p)
    assert rc == 0, log[-3000:]
    last = _metrics(out)[-1]
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert last["step"] == state["step"]  # both ranks stopped on this step (else: a hang, caught above)
    assert 0.9 * state["planned_steps"] <= state["step"] <= state["planned_steps"]
