"""Inference-time scaling: best-of-N with a verifier.

Each image is drawn N times (its own seed, then N - 1 seeds derived from it, as rejection derives its
redraws'), every candidate is scored by a verifier, and the best-scored one is kept (Ma et al. 2025,
"Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps": random search with a
verifier). Unlike rejection, which redraws only images that fail a threshold, best-of-N spends the same
N draws on every image and keeps the most convincing one. An image still depends only on its seed,
label and settings: its candidates' seeds and scores are its own.

Verifiers (`VERIFIERS`), each mapping candidates to a score where higher is better:
- "implicit": the model's own class evidence (samplers.implicit, what rejection reads): minus the
  relative margin of the asked class's denoising error. Costs len(implicit.SIGMAS) x num_classes network
  evaluations per candidate, and uses nothing but the generative model.
- "classifier": ditkit's MNIST classifier (eval.classifier), the log-probability of the asked digit. A
  few convolutions per candidate, but it is the same network that `ditkit eval` reads accuracy and FID
  with, so accuracy measured after selecting by it is optimistic (the judge picked the answers).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .errors import UsageError

VERIFIERS = ("implicit", "classifier")
# the stream of an image's seed that its best-of candidates 1..N-1 are drawn from (candidate 0 is the image's
# own draw, so best-of-1 is plain sampling; rejection's redraws use streams 1, 2, ... of the same seed)
BEST_OF_STREAM = 1 << 21


def check_best_of(model: Any, best_of: int, verifier: str) -> None:
    """A UsageError naming the flag unless best-of-`best_of` with `verifier` can run on `model`."""
    if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
        raise UsageError(f"--best-of {best_of!r}: must be an integer >= 1 (1 = off; N = keep the best of N draws)")
    if verifier not in VERIFIERS:
        raise UsageError(f"--verifier {verifier!r}: allowed {', '.join(VERIFIERS)}")
    if best_of == 1:
        return
    if model.num_classes < 2:
        raise UsageError("--best-of: the verifiers score how well an image shows its asked class; this model is "
                         "unconditional")
    if verifier == "classifier":
        from .eval.classifier import NUM_CLASSES

        if model.image_shape != (1, 28, 28) or model.num_classes != NUM_CLASSES:
            raise UsageError(f"--verifier classifier: ditkit's classifier reads 28x28 grey digits of "
                             f"{NUM_CLASSES} classes; this model draws {model.image_shape} images of "
                             f"{model.num_classes} classes (use --verifier implicit)")


def candidate_seeds(seeds: Sequence[int], n: int) -> list[list[int]]:
    """[candidate k's seeds for every image] for k in 0..n-1; candidate 0 is the images' own seeds."""
    from .utils import image_seeds

    return [list(seeds)] + [[image_seeds(s, 1, start=BEST_OF_STREAM + k)[0] for s in seeds] for k in range(1, n)]


def verifier_nfe(model: Any, verifier: str) -> int:
    """Network evaluations one candidate's verdict costs (the classifier is not the generative network: 0)."""
    if verifier == "implicit":
        from .samplers.implicit import SIGMAS

        return len(SIGMAS) * model.num_classes
    return 0


@torch.no_grad()
def scores(model: Any, x: torch.Tensor, labels: Sequence[int], seeds: Sequence[int], verifier: str) -> torch.Tensor:
    """(B,) float64 scores of images x (B, C, H, W) in [-1, 1] drawn for `labels`: higher = more convincing."""
    if verifier == "implicit":
        from .sampling import implicit_margins

        return -implicit_margins(model, x, labels, seeds).double().cpu()
    from .eval.classifier import default_classifier

    clf = default_classifier()
    logp = torch.log_softmax(clf(((x.float() + 1) / 2).clamp(0, 1).cpu()), dim=1)  # (B, 10)
    return logp.gather(1, torch.as_tensor(list(labels)).view(-1, 1)).view(-1).double()


@torch.no_grad()
def best_of_batch(model: Any, labels: Sequence[int], seeds: Sequence[int], n: int, verifier: str,
                  draw: Callable[[Sequence[int], Sequence[int]], torch.Tensor],
                  stats: Optional[dict] = None) -> torch.Tensor:
    """The best of `n` candidates of each image. `draw(labels, seeds)` samples a batch (B, C, H, W) in [-1, 1]
    (sampling.sample_batch with the request's settings). `stats`, if given, gets "candidates" (images drawn)
    and "verifier_nfe" (network evaluations spent on verdicts)."""
    best = best_score = None
    for k, cand in enumerate(candidate_seeds(seeds, n)):
        x = draw(labels, cand)
        s = scores(model, x, labels, cand, verifier)
        if best is None:
            best, best_score = x.clone(), s
        else:
            better = s > best_score  # ties keep the earlier candidate (the image's own draw first)
            best[better.to(best.device)] = x[better.to(x.device)]
            best_score = torch.where(better, s, best_score)
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + n * len(seeds)
        stats["verifier_nfe"] = stats.get("verifier_nfe", 0) + n * len(seeds) * verifier_nfe(model, verifier)
    return best
