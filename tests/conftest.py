"""Shared fixtures: a small trained run that tests of sampling, evaluation, the report and the
server can load (trained once per test session on real MNIST digits, a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# DiT-T/4 cut to 2 blocks of width 64 (2 heads), for tests of the training loop and its processes (resume,
# checkpoints, plans, compilation, DDP), which run the same code at every shape: ~4x faster a step (an
# AVX2-only host: 0.1 s against 0.4 s). The integration run and the shared fixtures keep the preset's shape.
SMALL_SHAPE = dict(depth=2, width=64, heads=2)
SMALL_SHAPE_ARGS = [arg for k, v in SMALL_SHAPE.items() for arg in (f"--{k}", str(v))]  # the same, for the CLI


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A DiT-T/4 run on MNIST (linear interpolant), 40 steps at batch 16, checkpoints at 20 and 40."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(out=str(out), model="DiT-T/4", objective="linear", batch_size=16, max_steps=40,
                      warmup_steps=10, log_every=5, ckpt_every=20, sample_every=0, sample_steps=2, progress=False,
                      subset=2000)
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_ddpm_run(tmp_path_factory) -> Path:
    """The same, with the DDPM objective (eps-prediction)."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny_ddpm"
    cfg = TrainConfig(out=str(out), model="DiT-T/4", objective="ddpm", batch_size=16, max_steps=20,
                      warmup_steps=10, log_every=5, ckpt_every=20, sample_every=0, sample_steps=2, progress=False,
                      subset=2000)
    return train(cfg)
