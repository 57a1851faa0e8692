"""The "masked" objective: masked-token modelling over a tokenizer's codes (MaskGIT, Chang et al. 2022,
sec. 3.1; Muse, Chang et al. 2023), the discrete counterpart of the diffusion objectives.

Training, per image: its codes y (N,) from the frozen tokenizer; a masking ratio gamma(r) = cos(pi r / 2)
for r ~ U[0, 1) (the cosine schedule, which the sampler follows too); ceil(gamma N) positions chosen
uniformly at random replaced by [MASK]; the loss is the cross-entropy of the network's logits against y
on the masked positions only (optionally label-smoothed), averaged over the batch's masked positions.
Labels are dropped to the null class with probability `label_dropout`, which trains the unconditional
model that classifier-free guidance needs.

Sampling belongs to the objective too (`sample_batch`): `ditkit.samplers.maskgit` draws the tokens and
the tokenizer decodes them. The tokenizer is a run folder of its own (family "vq"), recorded by path in
the objective's config with its codebook size; `attach` loads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..condition import Condition
from ..errors import DitkitError, UsageError
from .base import drop_labels

TOKENIZER_FAMILY = "vq"
# what `ditkit sample` and the trainer's grids use for a masked model when no sampler is asked for: guidance
# 1.5 on the logits (measured on MIM-T after 30 minutes, n = 2,000: FID 4.8x the floor at 99.4% read as asked,
# against 5.8x at 96.1% unguided and 8.3x / 13.4x at 2 / 3, docs/BENCHMARKS.md)
DEFAULT_SAMPLING = {"sampler": "maskgit", "steps": 12, "cfg_scale": 1.5}


def find_tokenizer(path: str | Path, run_dir: Optional[Path] = None) -> Path:
    """The tokenizer run folder `path`: as given, else (a tree of runs moved together) the folder of the
    same name beside `run_dir`. A DitkitError naming where it looked otherwise."""
    p = Path(path)
    tried = [p]
    if run_dir is not None and not p.is_dir():
        tried.append(Path(run_dir).parent / p.name)
    for cand in tried:
        if (cand / "config.json").is_file():
            return cand
    raise DitkitError(f"tokenizer {path}: not found (looked for a run folder with config.json at "
                      f"{', '.join(map(str, tried))}); train one with `ditkit train-tokenizer --out DIR`")


def load_tokenizer(path: str | Path, device: torch.device | str = "cpu", *, run_dir: Optional[Path] = None,
                   flag: str = "--tokenizer") -> nn.Module:
    """The VQ-VAE of tokenizer run `path` (its latest checkpoint), frozen, in eval mode on `device`.
    A run of another family (a DiT, a masked model) is refused by name."""
    from ..models.registry import build_model
    from ..runs import latest_checkpoint, load_weights, read_run_config

    folder = find_tokenizer(path, run_dir)
    cfg = read_run_config(folder)
    family = cfg.get("family", "dit")
    if family != TOKENIZER_FAMILY:
        raise UsageError(f"{flag} {path}: a {family!r} run, not a tokenizer; give the folder that "
                         "`ditkit train-tokenizer` wrote (family 'vq')")
    ck = latest_checkpoint(folder)
    if ck is None:
        raise DitkitError(f"{flag} {path}: the tokenizer run has no checkpoint yet")
    net = build_model(cfg["model"], TOKENIZER_FAMILY)
    try:
        net.load_state_dict(load_weights(ck, "model"))
    except RuntimeError as e:
        raise DitkitError(f"tokenizer checkpoint {ck}: weights do not match its config.json ({str(e)[:200]})") from None
    return net.to(device).eval().requires_grad_(False)


def masked_run_settings(tokenizer: Optional[str], image_shape: tuple[int, int, int], label_dropout: float,
                        label_smoothing: float = 0.1) -> tuple[dict[str, Any], dict[str, Any]]:
    """For training a masked model on images of `image_shape` (C, H, W) with the tokenizer run `tokenizer`:
    (the model config fields the tokenizer decides, the objective's config). The tokenizer's folder is
    recorded as an absolute path, so the run loads it from any working directory."""
    from ..runs import read_run_config

    if not tokenizer:
        raise UsageError("--tokenizer: a masked image model needs its tokenizer run (ditkit train-tokenizer "
                         "--out DIR, then --tokenizer DIR)")
    folder = find_tokenizer(tokenizer)
    cfg = read_run_config(folder)
    if cfg.get("family", "dit") != TOKENIZER_FAMILY:
        raise UsageError(f"--tokenizer {tokenizer}: a {cfg.get('family', 'dit')!r} run, not a tokenizer; give the "
                         "folder that `ditkit train-tokenizer` wrote (family 'vq')")
    m = cfg["model"]
    C, H, W = image_shape
    if (m["in_channels"], m["input_size"]) != (C, H) or H != W:
        raise UsageError(f"--tokenizer {tokenizer}: made for {m['in_channels']}x{m['input_size']}x{m['input_size']} "
                         f"images; this dataset's are {C}x{H}x{W}")
    grid = m["input_size"] // m["downsample"]
    model = {"codebook_size": m["codebook_size"], "grid_size": grid}
    objective = MaskedObjective(str(folder.resolve()), m["codebook_size"], grid, label_dropout, label_smoothing)
    return model, objective.config()


def cosine_mask_ratio(r: torch.Tensor) -> torch.Tensor:
    """gamma(r) = cos(pi r / 2): the fraction of tokens masked at schedule position r in [0, 1]."""
    return torch.cos(math.pi / 2 * r)


class MaskedObjective:
    """Masked-token loss over a tokenizer's codes, and sampling through MaskGIT decoding."""

    name = "masked"
    kind = "discrete"  # samplers of kind "discrete" only (settings.validate checks)
    stable_target = 0  # the training loop's reference images: none
    default_sampling = DEFAULT_SAMPLING

    def __init__(self, tokenizer: str, codebook_size: int, grid_size: int, label_dropout: float = 0.1,
                 label_smoothing: float = 0.1):
        if not isinstance(tokenizer, str) or not tokenizer:
            raise UsageError("objective masked: needs the tokenizer run folder (--tokenizer DIR)")
        for field, v, lo in (("codebook_size", codebook_size, 2), ("grid_size", grid_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(f"objective masked: {field}={v!r} must be an integer >= {lo}")
        if not 0 <= label_dropout < 1:
            raise UsageError(f"--label-dropout {label_dropout}: must be in [0, 1)")
        if not 0 <= label_smoothing < 1:
            raise UsageError(f"--label-smoothing {label_smoothing}: must be in [0, 1)")
        self.tokenizer_path = tokenizer
        self.codebook_size = codebook_size
        self.grid_size = grid_size
        self.label_dropout = float(label_dropout)
        self.label_smoothing = float(label_smoothing)
        self.tokenizer: Optional[nn.Module] = None

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": self.tokenizer_path, "codebook_size": self.codebook_size,
                "grid_size": self.grid_size, "label_dropout": self.label_dropout,
                "label_smoothing": self.label_smoothing}

    # ---- the tokenizer ----------------------------------------------------------------------------
    def attach(self, run_dir: Optional[Path], device: torch.device | str) -> None:
        """Load the tokenizer this objective was trained with, and check it is the same kind of tokenizer
        (codebook size, grid): a mismatch is a clear error, never silently wrong tokens."""
        tok = load_tokenizer(self.tokenizer_path, device, run_dir=run_dir, flag="tokenizer")
        tc = tok.config
        if tc.codebook_size != self.codebook_size:
            raise UsageError(f"tokenizer {self.tokenizer_path}: a codebook of {tc.codebook_size} codes, but the "
                             f"masked model was trained on {self.codebook_size}; give the tokenizer it was "
                             "trained with")
        if tc.grid_size != self.grid_size:
            raise UsageError(f"tokenizer {self.tokenizer_path}: a {tc.grid_size}x{tc.grid_size} grid, but the "
                             f"masked model was trained on {self.grid_size}x{self.grid_size}")
        self.tokenizer = tok

    def _tok(self) -> nn.Module:
        if self.tokenizer is None:
            raise DitkitError("objective masked: its tokenizer is not loaded (load the model with "
                              "ditkit.runs.load_model, or call objective.attach(run_dir, device))")
        return self.tokenizer

    @torch.no_grad()
    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, N) int64."""
        tok = self._tok()
        with torch.autocast(x0.device.type, enabled=False):  # nearest-code distances in fp32
            return tok.encode(x0.float()).flatten(1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images (B, C, H, W) in [-1, 1], one image at a time: a convolution's CPU kernel
        may change its summation order with the batch, and an image must not depend on its neighbours."""
        tok = self._tok()
        grid = tokens.view(-1, 1, self.grid_size, self.grid_size)
        return torch.cat([tok.decode(g) for g in grid]).clamp(-1, 1)

    # ---- training ---------------------------------------------------------------------------------
    def sample_noise(self, B: int, shape: tuple[int, ...], generator: Optional[torch.Generator] = None) -> dict:
        """A batch's randomness, drawn up front (as every objective's, so a data-parallel run can slice
        the global batch's): the schedule positions r (B,), the scores that rank which positions are
        masked (B, N), and which labels drop (B,)."""
        r = torch.rand((B,), generator=generator)
        scores = torch.rand((B, self.num_tokens), generator=generator)
        drop = torch.rand((B,), generator=generator) < self.label_dropout
        return dict(r=r, scores=scores, drop=drop)

    def mask_positions(self, r: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: for each row, the ceil(gamma(r) N) positions of lowest score (at least one)."""
        n_masked = torch.ceil(cosine_mask_ratio(r) * self.num_tokens).clamp(1, self.num_tokens).long()  # (B,)
        rank = scores.argsort(dim=1).argsort(dim=1)  # (B, N): each position's place in its row's order
        return rank < n_masked.to(rank.device)[:, None]

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Condition, noise: Optional[dict] = None,
             reference: Any = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Cross-entropy on the masked positions (module docstring); x0 (B, C, H, W) in [-1, 1]."""
        if noise is None:
            noise = self.sample_noise(x0.shape[0], tuple(x0.shape[1:]), generator)
        codes = self.encode(x0)  # (B, N)
        masked = self.mask_positions(noise["r"], noise["scores"]).to(codes.device)
        inputs = torch.where(masked, torch.full_like(codes, self.mask_id), codes)
        logits = net(inputs, drop_labels(cond, noise["drop"]))  # (B, N, K)
        return F.cross_entropy(logits[masked].float(), codes[masked], label_smoothing=self.label_smoothing)

    # ---- sampling ---------------------------------------------------------------------------------
    def sample_batch(self, model: Any, cond: Condition, seeds: list[int], settings: Any, *,
                     callback: Optional[Callable[[dict], None]] = None, stats: Optional[dict] = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for `cond` and per-image `seeds`, by MaskGIT decoding with
        `settings` (sampler "maskgit", its steps and options, cfg_scale on the logits)."""
        from ..samplers.maskgit import check_options, guided_logits, sample_maskgit
        from ..settings import SettingsError
        from ..utils import ImageRNG

        ag = settings.autoguidance
        unsupported = [("autoguidance", any(float(v) != 1 for v in (ag if isinstance(ag, (list, tuple)) else [ag]))),
                       ("guidance_interval", settings.guidance_interval is not None),
                       ("spacing", settings.spacing is not None),
                       ("cfg_schedule", settings.cfg_schedule != "constant"),
                       ("reject", settings.reject is not None)]
        for field, bad in unsupported:
            if bad:
                raise SettingsError(field, "not available for a masked image model (maskgit decodes tokens, it "
                                    "has no noise levels or denoiser); leave it out", getattr(settings, field))
        options = check_options(dict(settings.options))
        net = model.net
        rng = ImageRNG(seeds, model.device)
        calls = 0

        def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1  # one network evaluation (of 2B rows when guided), as a guided denoiser call counts once
            return guided(tokens)

        scale = settings.cfg_scale
        guided = guided_logits(net, cond, torch.as_tensor(scale, dtype=torch.float32)
                               if isinstance(scale, (list, tuple)) else float(scale))
        step_cb = None
        if callback is not None:
            step_cb = self._trajectory_callback(callback)
        tokens = sample_maskgit(logits_fn, len(seeds), self.num_tokens, settings.steps, mask_id=self.mask_id,
                                rng=rng, callback=step_cb, **options)
        if stats is not None:
            stats["nfe"] = calls
        return self.decode(tokens)

    def _trajectory_callback(self, callback: Callable[[dict], None]) -> Callable[[dict], None]:
        """The sampler's per-step state as the images a trajectory plot shows: `x` the committed tokens
        decoded with the still-masked cells grey (0), `denoised` the step's full predicted grid decoded,
        `sigma` the fraction of tokens still masked (1 -> 0, as a noise level falls)."""
        f = None

        def cb(state: dict) -> None:
            nonlocal f
            pred = self.decode(state["predicted"])  # (B, C, H, W)
            f = f or pred.shape[-1] // self.grid_size
            masked = state["masked"].view(-1, 1, self.grid_size, self.grid_size).float()
            cells = masked.repeat_interleave(f, 2).repeat_interleave(f, 3)  # (B, 1, H, W)
            x = pred * (1 - cells)
            callback({**state, "x": x, "denoised": pred, "sigma": float(state["masked"].float().mean())})

        return cb
