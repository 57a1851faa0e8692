"""INT8 inference: PyTorch's dynamic quantisation of a network's per-token linear maps.

`quantize_int8(net)` swaps every linear map that runs on tokens (attention's qkv and output maps, the MLP,
the output layer) for `torch.ao.nn.quantized.dynamic.Linear`: weights stored as int8, one scale per output
channel; at each call the activations are quantised to uint8 with one scale for the whole call (dynamic,
per tensor), the product runs in int8 with int32 accumulation (fbgemm / oneDNN on x86, qnnpack on ARM) and
the result comes back in fp32. The condition path (time and class embedders, adaLN modulations) stays
fp32: a sampler's (t, class) memo (`models.dit.ModulationCache`) computes it once per noise level, so
quantising it would cost accuracy and save no time.

Why torch.ao and not torchao's int8-dynamic-activation/int8-weight: on this project's CPU (Xeon, AVX-512
VNNI, 2 shared threads) the MLP of DiT-S/2 at batch 64 took 251 ms with torch.ao's kernel against 474 ms in
fp32, while torchao 0.18's tensor subclass ran 1,388 ms eagerly and 299 ms under `torch.compile` (no faster
than a compiled fp32 MLP): on the CPU it dequantises and multiplies unless inductor fuses it, and it needs
an extra package. INT8 pays where the maps are wide: at DiT-T's width 128 the quantise / dequantise passes
cost what the int8 products save (`benchmarks/int8.py` measures whole networks).

The activation scale is the call's, so unlike fp32 and bf16 an int8 image depends in its last bits on
the images drawn beside it (the batch's largest activation sets every image's rounding step); at a
fixed batch composition it is deterministic.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from .errors import UsageError

log = logging.getLogger(__name__)

QUANTIZE = ("none", "int8")
# Sub-modules whose linear maps see the condition (B rows), not the tokens (B * N rows): kept in fp32.
CONDITION_PATH = ("t_embedder", "y_embedder", "adaLN_modulation")
# x86 first: fbgemm's and oneDNN's VNNI kernels behind one name (torch >= 2.0); qnnpack on ARM.
ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


def check_quantize(mode: str | None) -> str:
    """'none' or 'int8' (None reads as 'none'); a UsageError naming the flag otherwise."""
    mode = "none" if mode is None else mode
    if mode not in QUANTIZE:
        raise UsageError(f"--quantize {mode!r}: allowed {', '.join(QUANTIZE)}")
    return mode


def supported_engines() -> list[str]:
    """The quantised engines of this PyTorch build ('none' alone where it has no kernels)."""
    return list(torch.backends.quantized.supported_engines)


def int8_engine() -> str | None:
    """The quantised engine this CPU's PyTorch build supports (see ENGINES), or None."""
    return next((e for e in ENGINES if e in supported_engines()), None)


def token_linears(net: nn.Module) -> list[str]:
    """Qualified names of the linear maps (nn.Linear and its subclasses, e.g. `models.layers.Linear`)
    outside the condition path: the ones `quantize_int8` swaps."""
    return [name for name, m in net.named_modules()
            if isinstance(m, nn.Linear) and not any(part in CONDITION_PATH for part in name.split("."))]


def int8_unavailable(net: nn.Module, device: torch.device) -> str | None:
    """Why INT8 cannot run here (a device or CPU without the kernels), or None."""
    if device.type != "cpu":
        return f"dynamic INT8 runs on the CPU only, and this model is on {device.type}"
    if int8_engine() is None:
        return f"this PyTorch build has no quantised CPU engine (supported: {', '.join(supported_engines())})"
    return None


def quantize_int8(net: nn.Module) -> int:
    """Swap `net`'s per-token linear maps for dynamically quantised INT8 ones, in place; returns how many.

    The network must be an fp32 inference copy (`eval()`, no gradients). A UsageError where the model
    cannot run INT8 (bf16 weights, no linear map to quantise, a compiled network)."""
    if net.training or any(p.requires_grad for p in net.parameters()):
        raise UsageError("--quantize int8: the model must be an inference copy (eval(), no gradients)")
    if getattr(net, "compiled", False):
        raise UsageError("--quantize int8 and --compile: the compiled graph holds the fp32 weights; use one of them")
    dtypes = {p.dtype for p in net.parameters()}
    if dtypes - {torch.float32}:
        raise UsageError(f"--quantize int8: quantises fp32 weights, this model's are "
                         f"{', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}; "
                         "use --precision fp32 (the default) with it")
    names = token_linears(net)
    if not names:
        raise UsageError(f"--quantize int8: {type(net).__name__} has no linear maps on its tokens to quantise")
    engine = int8_engine()
    torch.backends.quantized.engine = engine
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = getattr(parent, child)
        # from_float accepts nn.Linear itself only: ditkit's `Linear` subclass (batch-invariant padding, which
        # an int8 product with exact int32 sums does not need) is copied into a plain one first
        plain = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        plain.weight, plain.bias = old.weight, old.bias
        plain.qconfig = per_channel_dynamic_qconfig  # one weight scale per output channel
        with warnings.catch_warnings():  # torch 2.13 flags its quantised-tensor constructors as deprecated
            warnings.simplefilter("ignore", UserWarning)
            setattr(parent, child, DynamicQuantLinear.from_float(plain))
    return len(names)


def apply_quantize(net: nn.Module, mode: str | None, device: torch.device) -> str:
    """What `--quantize mode` does to a loaded network: 'none' leaves it; 'int8' quantises it, or, on a
    device or CPU without INT8 kernels, leaves it in fp32 and logs why. Returns what runs: 'int8' or 'none'."""
    if check_quantize(mode) == "none":
        return "none"
    why = int8_unavailable(net, device)
    if why is not None:
        log.warning("--quantize int8: %s; running in fp32", why)
        return "none"
    n = quantize_int8(net)
    log.info("--quantize int8: %d linear maps in INT8 (%s engine)", n, torch.backends.quantized.engine)
    return "int8"


def state_bytes(net: nn.Module) -> int:
    """Bytes of the network's weights as stored: parameters, buffers and packed INT8 weights (with their
    scales), the size a saved copy of this network takes."""
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.save(net.state_dict(), buf)
    return buf.tell()
