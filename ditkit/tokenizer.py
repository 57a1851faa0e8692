"""`ditkit train-tokenizer`: train the VQ-VAE tokenizer (ditkit.models.vq) of the masked image model, and
measure it.

The loop is its own, and short: a tokenizer has no noise, no classes and no sampler. Each step encodes a
batch, quantizes it (the codebook moves by EMA inside the quantizer, dead codes restart on batch
outputs), decodes it, and takes an Adam step on the reconstruction loss plus the commitment loss
(van den Oord et al. 2017, eq. 3; the codebook term is replaced by the EMA update). The learning rate
follows a half cosine from `lr` to 0 over the run (its length in steps, or in minutes when only a time
budget is given). The run folder is like every other (config.json with "family": "vq", safetensors
checkpoints through ditkit.runs), and `tokenizer_eval.json` holds its measurements:

- reconstruction FID of n training digits against the real-data floor at the same n (ditkit.eval);
- codebook usage over those digits' codes: perplexity exp(H) (K when every code is equally used),
  codes never used (dead), and bits per image: N log2 K as stored, N H / ln 2 at the codes' entropy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DitkitError, UsageError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "VQ-T/4"
RECON_LOSSES = ("l1", "mse")
EVAL_FILE = "tokenizer_eval.json"


@dataclass
class TokenizerTrainConfig:
    out: str = "runs/vq"
    model: str = DEFAULT_MODEL
    codebook_size: Optional[int] = None  # None: the preset's
    dataset: str = "mnist"
    subset: Optional[int] = None
    batch_size: int = 128
    lr: float = 2e-3
    recon_loss: str = "l1"  # L1 keeps strokes sharper than MSE at this size
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 0  # 0: only at the end
    eval_images: int = 2000  # reconstructions measured at the end (0 = none)
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = True

    def validate(self) -> "TokenizerTrainConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        need(self.max_steps is not None or self.max_minutes is not None, "give --max-steps or --max-minutes (or both)")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps {self.max_steps}: must be >= 1")
        need(self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
             f"--max-minutes {self.max_minutes}: must be > 0")
        need(self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr {self.lr}: must be a positive number")
        need(self.recon_loss in RECON_LOSSES, f"--recon-loss {self.recon_loss!r}: allowed {', '.join(RECON_LOSSES)}")
        need(self.eval_images == 0 or self.eval_images >= 2, f"--eval-images {self.eval_images}: 0 or >= 2")
        need(self.log_every >= 0 and self.ckpt_every >= 0, "--log-every / --ckpt-every: must be >= 0")
        need(self.subset is None or self.subset >= 1, f"--subset {self.subset}: must be >= 1")
        need(self.threads is None or self.threads >= 1, f"--threads {self.threads}: must be >= 1")
        return self


def _model_config(cfg: TokenizerTrainConfig, data) -> Any:
    from .models.registry import model_config, preset_family

    if preset_family(cfg.model) != "vq":
        raise UsageError(f"--model {cfg.model}: a {preset_family(cfg.model)!r} preset; a tokenizer is one of the "
                         "'vq' presets (e.g. VQ-T/4)")
    C, H, W = data.image_shape
    if H != W:
        raise UsageError(f"dataset images are {H}x{W}; the tokenizer needs square images")
    extra = {} if cfg.codebook_size is None else {"codebook_size": cfg.codebook_size}
    return model_config(cfg.model, input_size=H, in_channels=C, num_classes=0, **extra)


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train a tokenizer as `cfg` says; returns its run folder (config.json, checkpoints, metrics.jsonl,
    and tokenizer_eval.json when eval_images > 0)."""
    from . import __version__
    from .data import load_dataset
    from .models.registry import build_model
    from .runs import save_checkpoint
    from .utils import atomic_write_json, pick_device

    cfg.validate()
    run_dir = Path(cfg.out)
    if (run_dir / "config.json").exists():
        raise DitkitError(f"--out {run_dir} already holds a run; pick another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = load_dataset(cfg.dataset)
    if cfg.subset is not None:
        data = data.subset(cfg.subset)
    if cfg.batch_size > len(data):
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(data)} images)")
    mcfg = _model_config(cfg, data)
    config = {"ditkit_version": __version__, "family": "vq", "model_name": cfg.model, "model": mcfg.to_dict(),
              "objective": {"name": "vq-reconstruction", "recon_loss": cfg.recon_loss,
                            "commitment_weight": mcfg.commitment_weight},
              "train": asdict(cfg),
              "data": {"name": data.name, "shape": list(data.image_shape), "num_images": len(data)}}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config)

    torch.manual_seed(cfg.seed)  # initialisation, and the quantizer's k-means and code restarts
    net = build_model(mcfg).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    recon_fn = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the data order
    t0 = time.monotonic()
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None

    def progress_frac(step: int) -> float:
        fracs = [step / cfg.max_steps] if cfg.max_steps else []
        if deadline is not None:
            fracs.append((time.monotonic() - t0) / (deadline - t0))
        return min(1.0, max(fracs))

    step, perm, pos = 0, torch.randperm(len(data), generator=gen), 0
    metrics = open(run_dir / "metrics.jsonl", "a")
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, unit="step", dynamic_ncols=True, mininterval=1.0)
    win_loss, win_n, win_t = 0.0, 0, time.monotonic()
    try:
        while progress_frac(step) < 1.0:
            if pos + cfg.batch_size > len(perm):
                perm, pos = torch.randperm(len(data), generator=gen), 0
            x, _ = data.batch(perm[pos:pos + cfg.batch_size])
            pos += cfg.batch_size
            x = x.to(device)
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * progress_frac(step)))  # half cosine to 0
            for g in opt.param_groups:
                g["lr"] = lr
            recon, _, commit = net(x)
            rec = recon_fn(recon, x)
            loss = rec + commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            win_loss, win_n = win_loss + float(rec.detach()), win_n + 1
            if bar is not None:
                bar.update(1)
            if cfg.log_every and step % cfg.log_every == 0:
                now = time.monotonic()
                metrics.write(json.dumps(dict(step=step, recon=win_loss / win_n, commit=float(commit.detach()), lr=lr,
                                              img_per_s=win_n * cfg.batch_size / max(now - win_t, 1e-9),
                                              elapsed_s=now - t0)) + "\n")
                metrics.flush()
                if bar is not None:
                    bar.set_postfix(recon=f"{win_loss / win_n:.4f}")
                win_loss, win_n, win_t = 0.0, 0, now
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_checkpoint(run_dir, step, net, None, None, {"elapsed_s": time.monotonic() - t0}, {})
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    save_checkpoint(run_dir, step, net, None, None, {"elapsed_s": time.monotonic() - t0}, {})
    if cfg.eval_images:
        result = evaluate_tokenizer(net.eval(), n=cfg.eval_images, seed=cfg.seed)
        result["train_steps"], result["train_seconds"] = step, round(time.monotonic() - t0, 1)
        atomic_write_json(run_dir / EVAL_FILE, result)
    return run_dir


def code_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, Any]:
    """Codebook usage of `codes` (any shape, ints in [0, K)): perplexity exp(H) of the code histogram,
    used and dead (never used) codes, and H in bits per code."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    h_nats = float(-(nz * nz.log()).sum())
    return {"perplexity": math.exp(h_nats), "used_codes": int((counts > 0).sum()),
            "dead_codes": int((counts == 0).sum()), "entropy_bits_per_code": h_nats / math.log(2)}


@torch.no_grad()
def evaluate_tokenizer(net, n: int = 2000, seed: int = 0, batch_size: int = 500) -> dict[str, Any]:
    """Reconstruct n training digits (drawn with `seed`) and measure them (module docstring). The digits are
    training ones because the FID reference is the test set: reconstructions of the reference digits
    themselves would flatter the tokenizer, and the floor (real training digits against the test set)
    measures the same thing for real images."""
    from .data import load_dataset
    from .eval import evaluate_images
    from .sampling import to_uint8

    data = load_dataset("mnist")
    idx = torch.from_numpy(np.random.default_rng(seed).choice(len(data), size=min(n, len(data)), replace=False))
    device = next(net.parameters()).device
    recons, codes, mse = [], [], 0.0
    for i in range(0, len(idx), batch_size):
        x, _ = data.batch(idx[i:i + batch_size])
        x = x.to(device)
        c = net.encode(x)  # (b, h, w)
        r = net.decode(c).clamp(-1, 1)
        mse += float(F.mse_loss(r, x, reduction="sum")) / x[0].numel()
        recons.append(to_uint8(r))
        codes.append(c.cpu())
    cfg = net.config
    usage = code_usage(torch.cat(codes), cfg.codebook_size)
    ev = evaluate_images(np.concatenate(recons), data.labels[idx].numpy(), seed=seed)
    return {"n": len(idx), "recon_mse": mse / len(idx), "fid": ev["fid"], "fid_floor": ev["fid_floor"],
            "fid_ratio": ev["fid_ratio"], "class_accuracy": ev["class_accuracy"]["value"]
            if ev["class_accuracy"] else None,
            **usage, "codebook_size": cfg.codebook_size, "grid": [cfg.grid_size, cfg.grid_size],
            "bits_per_image": cfg.num_tokens * math.log2(cfg.codebook_size),
            "entropy_bits_per_image": cfg.num_tokens * usage["entropy_bits_per_code"]}


def format_eval(r: dict[str, Any]) -> str:
    acc = "" if r.get("class_accuracy") is None else f", class accuracy {100 * r['class_accuracy']:.1f}%"
    return (f"reconstruction of {r['n']} training digits: FID {r['fid']:.3f} = {r['fid_ratio']:.2f}x the real-data "
            f"floor {r['fid_floor']:.3f}{acc}, MSE {r['recon_mse']:.4f}\n"
            f"codebook: perplexity {r['perplexity']:.1f} of {r['codebook_size']} codes, {r['dead_codes']} dead; "
            f"{r['grid'][0]}x{r['grid'][1]} codes = {r['bits_per_image']:.0f} bits per image stored, "
            f"{r['entropy_bits_per_image']:.0f} at the codes' entropy")


def register(sub, parser_class) -> None:
    from .cli_args import positive_int, seed_int

    p = sub.add_parser("train-tokenizer", help="train the VQ tokenizer of a masked image model (ditkit train "
                                               "--model MIM-T --tokenizer DIR)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=TokenizerTrainConfig.out, help="the run folder to create")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a 'vq' preset: VQ-T/4, VQ-S/4 (7x7 codes), VQ-T/2 (14x14)")
    p.add_argument("--codebook-size", type=positive_int("--codebook-size"), help="codes (default: the preset's)")
    p.add_argument("--max-minutes", type=float, help="training time budget")
    p.add_argument("--max-steps", type=positive_int("--max-steps"))
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=TokenizerTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TokenizerTrainConfig.lr)
    p.add_argument("--recon-loss", choices=RECON_LOSSES, default=TokenizerTrainConfig.recon_loss)
    p.add_argument("--subset", type=positive_int("--subset"), help="train on the first N digits only")
    p.add_argument("--eval-images", type=int, default=TokenizerTrainConfig.eval_images,
                   help="reconstructions measured at the end (FID, codebook usage); 0 = none")
    p.add_argument("--seed", type=seed_int(), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int("--threads"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = TokenizerTrainConfig(out=args.out, model=args.model, codebook_size=args.codebook_size,
                               max_minutes=args.max_minutes, max_steps=args.max_steps, batch_size=args.batch_size,
                               lr=args.lr, recon_loss=args.recon_loss, subset=args.subset,
                               eval_images=args.eval_images, seed=args.seed, device=args.device,
                               threads=args.threads, progress=args.progress)
    run_dir = train_tokenizer(cfg)
    print(f"tokenizer: {run_dir}")
    if (run_dir / EVAL_FILE).exists():
        print(format_eval(json.loads((run_dir / EVAL_FILE).read_text())))
    return 0
