"""--memory-budget: the largest training batch whose step fits a memory budget, found by a short probe.

A training step holds the weights, their gradients, the EMA copy and the optimiser's state (fixed
bytes, measured on the model and optimiser themselves), and the activations the forward saves for the
backward, which grow linearly with the batch. The probe runs the training loss forward at two small
batches with a `saved_tensors_hooks` ledger of every tensor autograd keeps (each storage counted once)
and fits bytes(b) = a + per_image * b, so no batch that would not fit is ever tried. The largest batch
is then floor((budget - fixed - a) / per_image). The kernels' own scratch space is not in the ledger:
`HEADROOM` of the budget is left for it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from ..condition import Condition
from ..errors import UsageError

# share of the device's memory that the default budget takes: on a CPU its total RAM (shared with the
# data, the OS and other processes), on a GPU the memory free now
DEFAULT_CPU_FRACTION = 0.5
DEFAULT_GPU_FRACTION = 0.9
HEADROOM = 0.15  # of the budget, for the kernels' workspace and the allocator's fragmentation
PROBE_BATCHES = (2, 4)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, flag: str = "--memory-budget") -> int:
    """'4GiB', '512MB', '1.5G', '2000000' -> bytes; a UsageError naming `flag` otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise UsageError(f"{flag} {text!r}: give a size like 4GiB, 512MiB or 8GB (units B, KB, KiB, MB, MiB, GB, "
                         "GiB, TB, TiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"{flag} {text!r}: must be more than 0 bytes")
    return value


def device_memory(device: torch.device) -> int:
    """Bytes the default budget is a fraction of: total RAM on the CPU, free memory on a GPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device) -> int:
    frac = DEFAULT_GPU_FRACTION if device.type == "cuda" else DEFAULT_CPU_FRACTION
    return int(frac * device_memory(device))


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def saved_bytes(net: torch.nn.Module, objective: Any, shape: tuple, batch: int, num_classes: int,
                device: torch.device, amp: bool) -> int:
    """Bytes of the tensors autograd saves in one training forward at `batch` (each storage once), the
    weights themselves left out (they are counted in the fixed part)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(batch, *shape, device=device)
    cond = (Condition.from_labels(torch.arange(batch, device=device) % num_classes, num_classes) if num_classes
            else Condition.none(batch))
    noise = objective.sample_noise(batch, shape, g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = objective.loss(net, x, cond, noise=noise)
    del loss
    return sum(kept.values())


def _tensors_in(obj: Any):
    """Every tensor in a nested dict / list (an optimiser's state_dict: plain or ditkit's Muon pair)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def fixed_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights, their gradients, the EMA copy and the optimiser's state (after one step creates it)."""
    weights = _tensor_bytes(net.parameters())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = _tensor_bytes(_tensors_in(opt.state_dict()))
    opt.zero_grad(set_to_none=True)
    return 3 * weights + state  # weights, gradients, EMA weights; the optimiser's moments


def largest_batch(budget: int, fixed: int, base: int, per_image: int) -> int:
    """floor((budget * (1 - HEADROOM) - fixed - base) / per_image); a UsageError below one image."""
    usable = budget * (1 - HEADROOM) - fixed - base
    one = fixed + base + per_image
    if usable < per_image:
        raise UsageError(f"--memory-budget {fmt_bytes(budget)}: too small for one image a step; this model's "
                         f"training step takes ~{fmt_bytes(one / (1 - HEADROOM))} at batch 1 (weights, gradients, EMA "
                         f"and optimiser state {fmt_bytes(fixed)}, activations {fmt_bytes(per_image)} an image)")
    return int(usable // per_image)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def memory_plan(model_config: dict, objective: Any, shape: tuple, optimizer: str, device: torch.device,
                amp: bool, budget: int, grad_checkpoint: bool = False) -> dict[str, Any]:
    """Probe a fresh model at PROBE_BATCHES and return what config.json records: the budget, the fixed and
    per-image bytes, and `max_batch`, the largest batch that fits (a UsageError where none does)."""
    from ..models import build_model
    from .optim import build_optimizer

    net = build_model(model_config).to(device).train()
    net.grad_checkpoint = grad_checkpoint  # then only the blocks' inputs are kept
    opt = build_optimizer(net, optimizer, lr=1e-6, beta2=0.99, weight_decay=0.0, device=device)
    nc = int(model_config.get("num_classes", 0))
    b0, b1 = PROBE_BATCHES
    s0 = saved_bytes(net, objective, shape, b0, nc, device, amp)
    s1 = saved_bytes(net, objective, shape, b1, nc, device, amp)
    per_image = max(1, (s1 - s0) // (b1 - b0))
    base = max(0, s0 - per_image * b0)
    fixed = fixed_bytes(net, opt)
    return {"budget_bytes": int(budget), "fixed_bytes": int(fixed), "per_image_bytes": int(per_image),
            "base_bytes": int(base), "headroom": HEADROOM, "max_batch": largest_batch(budget, fixed, base, per_image)}


def fit_memory(cfg: Any, config: dict[str, Any], device: torch.device, world_size: int, batch: int) -> int:
    """--batch-size auto within the memory budget (--memory-budget, else `default_budget`): the smaller of
    `batch` (the speed-based choice) and the largest batch that fits, recorded in config["memory"]. With
    --memory-budget and a given --batch-size, a UsageError where that batch does not fit. DiT runs of
    class or unconditional models are probed; other families only where --memory-budget asks (refused)."""
    if config.get("family", "dit") != "dit" or getattr(cfg, "captions", None) is not None:
        if cfg.memory_budget is not None:
            raise UsageError(f"--memory-budget: the probe measures DiT class models; this run is a "
                             f"{config.get('family')!r} model (give --batch-size N instead)")
        return batch
    from ..objectives import build_objective

    budget = parse_bytes(cfg.memory_budget) if cfg.memory_budget is not None else default_budget(device)
    plan = memory_plan(config["model"], build_objective(config["objective"]), tuple(config["data"]["shape"]),
                       cfg.optimizer, device, config["precision"] == "bf16", budget, cfg.grad_checkpoint)
    fits = plan["max_batch"] * world_size  # each process holds its share of the global batch
    config["memory"] = {**plan, "source": "--memory-budget" if cfg.memory_budget is not None else "default"}
    if cfg.batch_size is not None:  # given: check it
        if cfg.batch_size > fits:
            raise UsageError(f"--batch-size {cfg.batch_size}: a training step at this batch needs "
                             f"~{fmt_bytes(plan['fixed_bytes'] + plan['base_bytes'] + plan['per_image_bytes'] * cfg.batch_size // world_size)}"
                             f"; --memory-budget {fmt_bytes(budget)} holds at most batch {fits}")
        return cfg.batch_size
    chosen = min(batch, fits - fits % world_size) if fits >= world_size else fits
    if chosen < batch:
        import logging

        logging.getLogger(__name__).info("--batch-size auto: %d, the largest that fits %s (%s an image)", chosen,
                                         fmt_bytes(budget), fmt_bytes(plan["per_image_bytes"]))
    return max(chosen, 1)


def check_grad_checkpoint(cfg: Any, config: dict[str, Any]) -> None:
    """--grad-checkpoint checkpoints a DiT's blocks; a UsageError for a family without them."""
    if cfg.grad_checkpoint and config.get("family", "dit") != "dit":
        raise UsageError(f"--grad-checkpoint: checkpoints a DiT's blocks; this run is a {config.get('family')!r} "
                         "model (train without it)")
