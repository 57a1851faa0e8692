"""Gradient checkpointing against none: peak memory and step time of training, each setting in a fresh
process (its peak resident set is its own).

    python benchmarks/grad_checkpoint.py [--model DiT-B/2] [--batch 64] [--steps 2] [--precision auto]
    python benchmarks/grad_checkpoint.py --batch 64 --measure-batch 4   # RSS and time at 4, the ledger at 64

A step is the training loss's forward and backward and an AdamW step (Muon's Newton-Schulz iterations on
DiT-B's matrices would add the same time to both settings, minutes on a shared 2-core host), on
MNIST-shaped random images. Peak memory: the process's maximum resident set
(getrusage) minus its resident set once the model and optimiser exist, i.e. what the steps add
(activations, gradients, optimiser state); the total is printed too. Step time: the fastest step after
the first. The ledger (train.memory: the tensors autograd keeps, each storage once, and the weights,
gradients, EMA and optimiser state) predicts each setting's bytes at `--batch` from a probe at batches 2
and 4; with `--measure-batch` smaller than `--batch` (a slow machine) the processes run at that batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(model: str, batch: int, steps: int, checkpoint: bool, precision: str) -> dict:
    import torch

    from ditkit.condition import Condition
    from ditkit.models import build_model, model_config
    from ditkit.objectives import build_objective
    from ditkit.train.optim import build_optimizer
    from ditkit.utils import resolve_precision

    torch.manual_seed(0)
    net = build_model(model_config(model)).train()
    net.grad_checkpoint = checkpoint
    opt = build_optimizer(net, "adamw", lr=1e-4, beta2=0.99, weight_decay=0.0, device=torch.device("cpu"))
    objective = build_objective({"name": "linear", "prediction": "velocity", "time_sampling": "logit-normal",
                                 "logit_mean": 0.0, "label_dropout": 0.1})
    amp = resolve_precision(precision, torch.device("cpu")) == "bf16"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    cond = Condition.from_labels(torch.arange(batch) % 10, 10)
    base = rss_bytes()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = objective.loss(net, x, cond, noise=objective.sample_noise(batch, (1, 28, 28), g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"grad_checkpoint": checkpoint, "model": model, "batch": batch, "precision": "bf16" if amp else "fp32",
            "peak_rss_gib": peak / 2**30, "steps_added_gib": (peak - base) / 2**30,
            "step_s": min(times[1:] or times), "loss": float(loss)}


def ledger(model: str, batch: int, precision: str) -> dict:
    """The memory ledger's prediction of a step at `batch`, without and with checkpointing (GiB)."""
    import torch

    from ditkit.models import model_config
    from ditkit.objectives import build_objective
    from ditkit.train.memory import memory_plan
    from ditkit.utils import resolve_precision

    objective = build_objective({"name": "linear", "prediction": "velocity", "time_sampling": "logit-normal",
                                 "logit_mean": 0.0, "label_dropout": 0.1})
    amp = resolve_precision(precision, torch.device("cpu")) == "bf16"
    out = {"ledger_batch": batch}
    for on in (False, True):
        p = memory_plan(model_config(model).to_dict(), objective, (1, 28, 28), "adamw", torch.device("cpu"), amp,
                        2**50, grad_checkpoint=on)
        tag = "on" if on else "off"
        out[f"ledger_{tag}_activations_gib"] = (p["base_bytes"] + batch * p["per_image_bytes"]) / 2**30
        out[f"ledger_{tag}_total_gib"] = out[f"ledger_{tag}_activations_gib"] + p["fixed_bytes"] / 2**30
    out["ledger_total_saved"] = 1 - out["ledger_on_total_gib"] / out["ledger_off_total_gib"]
    out["ledger_activations_saved"] = 1 - out["ledger_on_activations_gib"] / out["ledger_off_activations_gib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-B/2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--measure-batch", type=int, default=None, help="the batch of the measured steps (default --batch)")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.batch, args.steps, args.child == "on", args.precision)))
        return
    res = {}
    print(json.dumps(ledger(args.model, args.batch, args.precision)), flush=True)
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--model", args.model, "--batch",
                              str(args.measure_batch or args.batch), "--steps", str(args.steps),
                              "--precision", args.precision],
                             capture_output=True, text=True, check=True)
        res[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res[setting]), flush=True)
    off, on = res["off"], res["on"]
    print(json.dumps({"memory_saved": 1 - on["steps_added_gib"] / off["steps_added_gib"],
                      "peak_saved": 1 - on["peak_rss_gib"] / off["peak_rss_gib"],
                      "step_time_cost": on["step_s"] / off["step_s"] - 1,
                      "same_loss": on["loss"] == off["loss"]}))


if __name__ == "__main__":
    main()
