"""Shared fixtures: a small trained run that tests of sampling, evaluation, the report and the
server can load (trained once per test session on real MNIST digits, a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
