"""INT8 against fp32 inference on this CPU: latency of one image, images/s at batch 64, weight bytes, and
(on a trained run) the FID and class-accuracy change at the same seeds.

    python benchmarks/int8.py --ckpt runs/levers_t4 [--num 2000]     # a trained run: speed and quality
    python benchmarks/int8.py --preset DiT-S/2                        # random weights: speed and size only
    python benchmarks/int8.py --preset DiT-S/2 --kernels              # also torchao's int8 (eager, compiled)

Latency: one image, 20 NFE of the default sampler, unguided, median of `--repeats`. Throughput: the
network's forward at `--batch` (64), median of `--forwards`, read as images/s at 20 NFE (B / (20 * t)).
fp32 and int8 alternate for `--rounds` rounds; the best round of each is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch

NFE = 20


def forward_seconds(net, batch: int, repeats: int) -> float:
    """Median seconds of one forward of `net` on a batch (after one untimed forward)."""
    from ditkit.condition import Condition

    c = net.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    cond = (Condition.from_labels(torch.arange(batch) % c.num_classes, c.num_classes) if c.num_classes
            else Condition.none(batch))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            net(x, t, cond)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_error(ref_net, net, batch: int = 16) -> float:
    """||int8 - fp32|| / ||fp32|| of one forward on noisy inputs over the whole range of times."""
    from ditkit.condition import Condition

    c = ref_net.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.linspace(0.02, 0.98, batch)
    cond = (Condition.from_labels(torch.arange(batch) % c.num_classes, c.num_classes) if c.num_classes
            else Condition.none(batch))
    with torch.no_grad():
        ref = ref_net(x, t, cond)
        return float((net(x, t, cond) - ref).norm() / ref.norm())


def latency_ms(model, repeats: int) -> float:
    """Median ms of one image, 20 NFE of the default sampler (one untimed warm-up)."""
    from ditkit.sampling import sample_batch

    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        sample_batch(model, [i % max(model.num_classes, 1)], [i], steps=NFE)
        if i:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def random_model(preset: str):
    """A LoadedModel of `preset` (MNIST shape) with random weights: adaLN and output maps drawn too, so that
    every block does work (a fresh DiT's adaLN-Zero blocks are the identity)."""
    from ditkit.models import build_model, model_config
    from ditkit.objectives import build_objective
    from ditkit.runs import LoadedModel

    torch.manual_seed(0)
    net = build_model(model_config(preset))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    net.eval().requires_grad_(False)
    objective = build_objective({"name": "linear", "prediction": "velocity", "time_sampling": "logit-normal",
                                 "logit_mean": 0.0, "label_dropout": 0.1})
    return LoadedModel(net, objective, {"model": net.config.to_dict()})


def torchao_kernels(net, batch: int, repeats: int) -> dict:
    """torchao's int8 dynamic-activation int8-weight on the same linear maps, eager and compiled."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise SystemExit("--kernels: needs torchao (pip install torchao)") from None

    from ditkit.quantize import token_linears

    names = set(token_linears(net))
    q = copy.deepcopy(net)
    quantize_(q, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in names)
    out = {"torchao_eager_s": forward_seconds(q, batch, max(1, repeats // 2))}
    q.compile_for_inference = None  # the plain module compiled as torchao documents it
    compiled = torch.compile(q)
    out["torchao_compiled_s"] = forward_seconds(compiled, batch, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a trained run: speed, size and the FID / accuracy change")
    src.add_argument("--preset", help="a preset with random weights: speed and size")
    ap.add_argument("--num", type=int, default=2000, help="images for FID and accuracy (with --ckpt)")
    ap.add_argument("--repeats", type=int, default=3, help="timed one-image samples, per round")
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards at --batch, per round")
    ap.add_argument("--batch", type=int, default=64, help="the batch of the throughput figure")
    ap.add_argument("--rounds", type=int, default=3, help="fp32 / int8 alternations")
    ap.add_argument("--kernels", action="store_true", help="also time torchao's int8 kernels")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    from ditkit.quantize import quantize_int8, state_bytes

    if args.ckpt:
        from ditkit.runs import load_model
        fp32 = load_model(args.ckpt)
        name = fp32.config.get("model_name", str(args.ckpt))
    else:
        fp32 = random_model(args.preset)
        name = args.preset
    int8 = copy.copy(fp32)
    int8.net = copy.deepcopy(fp32.net)
    quantize_int8(int8.net)
    res = {"model": name, "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
           "engine": torch.backends.quantized.engine}
    # fp32 and int8 alternate, round by round (a shared CPU's load then falls on both alike); the best
    # round of each is kept
    lat = {"fp32": [], "int8": []}
    fwd = {"fp32": [], "int8": []}
    for _ in range(args.rounds):
        for tag, m in (("fp32", fp32), ("int8", int8)):
            lat[tag].append(latency_ms(m, args.repeats))
            fwd[tag].append(forward_seconds(m.net, args.batch, args.forwards))
    for tag, m in (("fp32", fp32), ("int8", int8)):
        res[f"{tag}_bytes"] = state_bytes(m.net)
        res[f"{tag}_latency_ms"] = min(lat[tag])
        res[f"{tag}_forward_s"] = min(fwd[tag])
        res[f"{tag}_img_per_s_20nfe"] = args.batch / (NFE * min(fwd[tag]))
    res["batch"] = args.batch
    res["forward_rel_error"] = forward_error(fp32.net, int8.net)
    res["speedup_batch"] = res["int8_img_per_s_20nfe"] / res["fp32_img_per_s_20nfe"]
    res["speedup_latency"] = res["fp32_latency_ms"] / res["int8_latency_ms"]
    res["size_ratio"] = res["int8_bytes"] / res["fp32_bytes"]
    if args.kernels:
        res.update(torchao_kernels(fp32.net, args.batch, args.forwards))
    if args.ckpt:
        from ditkit.eval.metrics import evaluate_images
        from ditkit.sampling import generate

        for tag, m in (("fp32", fp32), ("int8", int8)):
            out = generate(m, num=args.num, labels="all", seed=0, batch_size=100)
            ev = evaluate_images(out["images"], out["labels"])
            res[f"{tag}_fid"] = ev["fid"]
            res[f"{tag}_fid_ratio"] = ev["fid_ratio"]
            res[f"{tag}_accuracy"] = ev["class_accuracy"]["value"] if ev["class_accuracy"] else None
        res["fid_change"] = res["int8_fid"] / res["fp32_fid"] - 1
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
