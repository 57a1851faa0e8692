"""MaskGIT's iterative parallel decoding (Chang et al. 2022, "MaskGIT: Masked Generative Image
Transformer", sec. 3.2) for a masked-token model: the discrete counterpart of the continuous samplers.

    sample_maskgit(logits_fn, batch, num_tokens, steps, *, mask_id, rng, callback=None, **options) -> tokens

`logits_fn(tokens (B, N) int64) -> logits (B, N, K)`: the network with its condition bound, guidance
included (`guided_logits`). `rng` is an `ImageRNG` (one generator per image), so an image's tokens never
depend on its batch neighbours. The function keeps no state between calls.

Each step t = 0..T-1 (the paper's "predict, sample, mask schedule, mask"):
  1. predict: logits for every position, from the tokens committed so far (masked ones read [MASK]);
  2. sample: a token for each masked position from softmax(logits / temperature) (Gumbel-max);
     its confidence is its log-probability under the model;
  3. schedule: n_t = floor(N cos(pi/2 (t+1)/T)) positions stay masked (the cosine mask schedule gamma,
     sec. 3.2 and fig. 3: few tokens first, most of them late);
  4. mask: the n_t least confident of the newly sampled tokens are masked again, the others committed.
     Committed tokens get confidence +inf and are never masked again. Gumbel noise scaled by
     choice_temperature * (1 - (t+1)/T) is added to the confidences first, so the choice of what to
     commit is random early and greedy late (the annealed "mask_by_random_topk" of the authors' code).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..condition import Condition
from ..errors import UsageError
from ..utils import ImageRNG

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_STEPS = 12
OPTIONS = {"temperature": 1.0, "choice_temperature": 4.5}  # option -> default (MaskGIT's 4.5)


def mask_schedule(num_tokens: int, steps: int) -> list[int]:
    """How many of `num_tokens` positions are still masked after each of `steps` steps (the last is 0).

    n_t = floor(N cos(pi/2 t/T)) for t = 1..T, clamped so that every step commits at least one token
    (n_t <= n_{t-1} - 1) and leaves at least one for each later step (n_t >= T - t)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_tokens:
        raise UsageError(f"--steps {steps}: the maskgit sampler needs 1 to {num_tokens} steps "
                         f"(it commits at least one of the grid's {num_tokens} tokens a step)")
    out, prev = [], num_tokens
    for t in range(1, steps + 1):
        n = math.floor(num_tokens * math.cos(math.pi / 2 * t / steps))
        n = max(min(n, prev - 1), steps - t)
        out.append(n)
        prev = n
    return out


def check_options(options: dict[str, Any]) -> dict[str, float]:
    """The sampler's options with defaults filled in; a UsageError naming an unknown or bad one."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"sampler 'maskgit': unknown option(s) {', '.join(unknown)}; allowed options: "
                         f"{', '.join(OPTIONS)}")
    out = {**OPTIONS, **options}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"sampler 'maskgit': option {k}={v!r} must be a finite number >= 0")
    return {k: float(v) for k, v in out.items()}


def gumbel(rng: ImageRNG, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard Gumbel noise -log(-log u), row b from image b's generator."""
    u = rng.rand(shape, dtype=torch.float32).clamp_(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))


def guided_logits(net: Any, cond: Condition, cfg_scale: float | torch.Tensor = 1.0) -> LogitsFn:
    """logits_fn for `net(tokens, cond) -> (B, N, K)` with classifier-free guidance on the logits:
    l_u + w (l_c - l_u) (Ho & Salimans 2022, applied to logits as in MaskGIT/Muse), the conditional and
    null rows in one forward of 2B rows. w: a float or one value per image (B,); w = 1 everywhere is the
    plain conditional forward."""
    scale = torch.as_tensor(cfg_scale, dtype=torch.float32)
    if (cond.labels is None and cond.tokens is None) or bool((scale == 1).all()):
        return lambda tokens: net(tokens, cond).float()
    both = Condition.cat(cond, cond.null())

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        lc, lu = net(torch.cat([tokens, tokens]), both).float().chunk(2)  # each (B, N, K)
        w = scale.to(lc.device).view(-1, 1, 1) if scale.ndim else float(scale)
        return lu + w * (lc - lu)

    return fn


@torch.no_grad()
def sample_maskgit(logits_fn: LogitsFn, batch: int, num_tokens: int, steps: int = DEFAULT_STEPS, *, mask_id: int,
                   rng: ImageRNG, callback: Optional[Callable[[dict], None]] = None,
                   temperature: float = 1.0, choice_temperature: float = 4.5) -> torch.Tensor:
    """Tokens (B, N) int64 in [0, K), from a fully masked grid in `steps` steps (module docstring).

    callback({"i", "steps", "tokens", "predicted", "committed", "masked"}) after step i: the state
    `tokens` (masked positions hold mask_id), the full `predicted` grid the step sampled, the positions
    `committed` at this step and those still `masked` (B, N) bool."""
    if len(rng) != batch:
        raise UsageError(f"sampler 'maskgit': {len(rng)} image generators for a batch of {batch}")
    plan = mask_schedule(num_tokens, steps)
    tokens = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=rng.device)
    for i, n_masked in enumerate(plan):
        unknown = tokens == mask_id  # (B, N)
        logits = logits_fn(tokens).float()  # (B, N, K)
        logp = torch.log_softmax(logits, dim=-1)
        if temperature > 0:  # Gumbel-max: argmax(l / tau + g) is a draw from softmax(l / tau)
            sampled = torch.argmax(logits / temperature + gumbel(rng, tuple(logits.shape[1:])).to(logits.device), -1)
        else:
            sampled = torch.argmax(logits, dim=-1)
        sampled = torch.where(unknown, sampled, tokens)  # committed tokens stay as they are
        conf = logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # (B, N) log p of the sampled token
        anneal = choice_temperature * (1 - (i + 1) / steps)
        if anneal > 0:
            conf = conf + anneal * gumbel(rng, (num_tokens,)).to(conf.device)
        conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))
        # the n_masked least confident positions stay masked (all among `unknown`: the schedule leaves
        # fewer masked than were masked, and committed ones sort last at +inf); a stable sort breaks ties
        # by position, the same in any batch
        lowest = torch.sort(conf, dim=1, stable=True).indices[:, :n_masked]
        still = torch.zeros_like(unknown).scatter_(1, lowest, True)
        tokens = torch.where(still, torch.full_like(sampled, mask_id), sampled)
        if callback is not None:
            callback({"i": i, "steps": steps, "tokens": tokens, "predicted": sampled, "committed": unknown & ~still,
                      "masked": still})
    return tokens


sample_maskgit.sampler_name = "maskgit"
sample_maskgit.options = dict(OPTIONS)
