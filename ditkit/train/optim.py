"""The training optimisers: AdamW, or Muon on the transformer blocks' matrices with AdamW on the rest.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is Scalable for
LLM Training") takes each weight matrix's Nesterov momentum and replaces it by its nearest semi-orthogonal
matrix, approximately, through a few Newton-Schulz iterations; its update is then scaled to AdamW's RMS
(0.2 sqrt(max(rows, cols)), Liu et al.'s "match_rms_adamw"), so the AdamW learning rate serves both. It is
meant for the hidden matrices only: the embeddings, the output layer, vectors (biases, norms) and, here,
the adaLN modulations stay on AdamW (`muon_parameters`).

`torch.optim.Muon` orthogonalises one matrix at a time; a DiT has a few matrix shapes, repeated once per
block, so `Muon` here runs the iteration on each shape's matrices stacked (tall ones transposed): one
batched product per step of the iteration instead of one per matrix, the same arithmetic per matrix (bf16
products, as the reference; tested against `torch.optim.Muon`). DiT-T/4's 16 matrices make 3 stacks: a
compiled bf16 training step at batch 64 runs ~8-10% slower than with fused AdamW, against ~21% with
`torch.optim.Muon` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import UsageError

OPTIMIZERS = ("adamw", "muon")
# --weight-decay auto (decoupled: each step scales the weights by 1 - lr * wd). Muon's 0.1 is Liu et al.
# 2025's: without it a 30-minute run's samples got worse from ~10,000 steps on while its held-out loss still
# fell (3.70x the FID floor under make demo's setting; five runs with it 0.79-1.10x); after 10 minutes
# both read alike (docs/BENCHMARKS.md). AdamW's 0: DiT's and SiT's recipe (0.03 measured no better).
DEFAULT_WEIGHT_DECAY = {"adamw": 0.0, "muon": 0.1}
# the quintic Newton-Schulz coefficients of Jordan et al. (and torch.optim.Muon): steepest slope at zero,
# singular values brought into ~[0.7, 1.2] in 5 steps rather than exactly to 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_MOMENTUM = 0.95


def zeropower_newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for each matrix of g (k, m, n) = U S V^T with m <= n, by `steps` quintic
    Newton-Schulz iterations in bf16 (after scaling each matrix to Frobenius norm 1, which bounds its
    spectral norm by 1). Returns bf16 (k, m, n)."""
    if g.shape[-2] > g.shape[-1]:
        raise ValueError(f"zeropower_newton_schulz takes wide matrices (rows <= columns); got {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # the smaller side's Gram matrix
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module's docstring): Nesterov momentum `momentum`, Newton-Schulz
    orthogonalisation of the matrices of each shape together, decoupled weight decay, and the update
    scaled by 0.2 sqrt(max(rows, cols)) so that `lr` is on AdamW's scale."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, momentum: float = MUON_MOMENTUM,
                 weight_decay: float = 0.0, ns_steps: int = NS_STEPS):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices only (a conv kernel counts as one); got a parameter "
                                     f"of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon does not take a closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            m = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - m)  # buf = m buf + (1 - m) g
            updates = torch._foreach_lerp(grads, bufs, m)  # Nesterov: (1 - m) g + m buf
            # a conv kernel (out, in, kh, kw) is orthogonalised as the matrix (out, in * kh * kw), as in Jordan
            # et al.'s convolutional networks; a matrix is itself
            updates = [u.reshape(u.shape[0], -1) for u in updates]
            # the matrices of one shape, tall ones transposed (the iteration runs on the wide form), together
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, u in enumerate(updates):
                by_shape[tuple(sorted(u.shape))].append(i)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for shape, idx in by_shape.items():
                tall = [updates[i].shape[0] > updates[i].shape[1] for i in idx]
                ortho = zeropower_newton_schulz(torch.stack([updates[i].mT if t else updates[i]
                                                             for i, t in zip(idx, tall)]), group["ns_steps"])
                scale = -group["lr"] * 0.2 * max(shape) ** 0.5
                torch._foreach_add_([params[i] for i in idx],
                                    [(o.mT if t else o).reshape(params[i].shape).to(params[i].dtype)
                                     for i, o, t in zip(idx, ortho.unbind(0), tall)],
                                    alpha=scale)
        return None


def muon_parameters(model: nn.Module) -> list[str]:
    """The names of the parameters Muon takes: the 2-D weights inside the transformer blocks (attention
    and MLP), not their adaLN modulations (which start at zero and act as per-condition gains), nor the
    embeddings, the output layer, biases or norms. A network that is not a DiT names its own hidden
    matrices (and conv kernels) with a `muon_parameters()` method (e.g. `models.unet.UNet`)."""
    own = getattr(model, "muon_parameters", None)
    if callable(own):
        return list(own())
    return [n for n, p in model.named_parameters()
            if p.ndim == 2 and n.startswith("blocks.") and "adaLN" not in n]


class MuonAdamW:
    """Muon on `muon_parameters(model)`, fused AdamW on the rest, behind one optimiser's face: `param_groups`
    (AdamW's, then Muon's: the training loop sets each group's lr), `zero_grad`, `step`, and a
    `state_dict` / `load_state_dict` in torch's layout with the parameters numbered AdamW's first, so a
    checkpoint stores and restores it like any optimiser's."""

    def __init__(self, model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                 fused: bool):
        names = set(muon_parameters(model))
        adam_p = [p for n, p in model.named_parameters() if n not in names]
        muon_p = [p for n, p in model.named_parameters() if n in names]
        if not muon_p:
            raise UsageError("--optimizer muon: this model has no matrices inside transformer blocks")
        self.adamw = torch.optim.AdamW(adam_p, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
        self.muon = Muon(muon_p, lr=lr, weight_decay=weight_decay)
        self.n_adam = len(adam_p)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def state_dict(self) -> dict[str, Any]:
        a, m = self.adamw.state_dict(), self.muon.state_dict()
        state = dict(a["state"])
        state.update({i + self.n_adam: v for i, v in m["state"].items()})
        groups = [dict(g, optimizer="adamw") for g in a["param_groups"]]
        groups += [dict(g, optimizer="muon", params=[i + self.n_adam for i in g["params"]])
                   for g in m["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        kinds = [g.get("optimizer") for g in sd["param_groups"]]
        if "muon" not in kinds:
            raise UsageError("--resume: the run's checkpoint holds an AdamW state, not Muon's; "
                             "resume with the run's own --optimizer")
        strip = lambda g: {k: v for k, v in g.items() if k != "optimizer"}  # noqa: E731
        a_groups = [strip(g) for g in sd["param_groups"] if g.get("optimizer") == "adamw"]
        m_groups = [dict(strip(g), params=[i - self.n_adam for i in g["params"]])
                    for g in sd["param_groups"] if g.get("optimizer") == "muon"]
        a_ids = {i for g in a_groups for i in g["params"]}
        self.adamw.load_state_dict({"state": {i: v for i, v in sd["state"].items() if int(i) in a_ids},
                                    "param_groups": a_groups})
        self.muon.load_state_dict({"state": {int(i) - self.n_adam: v for i, v in sd["state"].items()
                                             if int(i) not in a_ids},
                                   "param_groups": m_groups})


def build_optimizer(model: nn.Module, name: str, *, lr: float, beta2: float, weight_decay: float,
                    device: torch.device):
    """The run's optimiser: "adamw" (fused where the device has the kernel) or "muon" (`MuonAdamW`)."""
    fused = device.type in ("cpu", "cuda")  # one kernel for all parameters: ~6% of a DiT-T/4 step on the CPU
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=weight_decay,
                                 fused=fused)
    if name == "muon":
        return MuonAdamW(model, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, fused=fused)
    raise UsageError(f"--optimizer {name!r}: allowed {', '.join(OPTIMIZERS)}")
