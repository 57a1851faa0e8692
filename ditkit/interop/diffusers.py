"""ditkit's DiT <-> diffusers' `DiTTransformer2DModel`, weight for weight.

The two networks are the same architecture (Peebles & Xie 2023) under different names:

    ditkit (models/dit.py)                 diffusers (dit_transformer_2d.py, attention.py)
    x_embedder.proj  (conv, D x C x P x P)  pos_embed.proj
    pos_embed        (fixed sin-cos table)  pos_embed.pos_embed, recomputed from sample_size: the same table
    t_embedder.mlp.{0,2}                    transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}
    y_embedder.table (K + 1 rows)           transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
    blocks.{i}.adaLN_modulation.1           transformer_blocks.{i}.norm1.linear   (same chunk order:
                                            shift, scale, gate of attention, then of the MLP)
    blocks.{i}.attn.qkv   (3D x D)          transformer_blocks.{i}.attn1.to_q / to_k / to_v (its thirds)
    blocks.{i}.attn.proj                    transformer_blocks.{i}.attn1.to_out.0
    blocks.{i}.mlp.fc1 / fc2                transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1          proj_out_1  (shift, scale)
    final_layer.linear                      proj_out_2

diffusers gives every block its own copy of the timestep and label embedders (the final layer reads block
0's); ditkit shares one, so an export writes the same weights into each block and an import requires them
equal. Where the architectures differ, an export is refused with the reason (`check_exportable`):

- the timestep's sinusoidal frequencies: diffusers' DiT uses `Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)`, i.e. 10000^(-i/127), i < 128; facebookresearch/DiT and ditkit's default
  10000^(-i/128). cos(f t) at different frequencies are linearly independent functions of t, so no weights
  make one network the other: only a DiT with `time_freq_shift=1` (diffusers' frequencies) exports.
- a learned position embedding (diffusers recomputes a fixed table and does not load one), RMSNorm,
  QK-norm, SwiGLU, RoPE, an MLP other than 4x wide: diffusers' DiT block has none of them.

Everything else maps exactly: `export_diffusers` loads its own output back with
`DiTTransformer2DModel.from_pretrained` and refuses to finish unless the two networks agree within
EXPORT_TOLERANCE on probe inputs. The one numerical difference that remains on import is the MLP norm's
epsilon (diffusers' `norm_eps`, 1e-5 by default and in facebook's DiT-XL-2; ditkit's 1e-6, which an export
writes): `import_diffusers` measures the difference on probe inputs and records it in the run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..condition import Condition
from ..errors import DitkitError, UsageError
from ..models.dit import DiT, DiTConfig

DIFFUSERS_CLASS = "DiTTransformer2DModel"
LEGACY_CLASS = "Transformer2DModel"  # what facebook/DiT-XL-2-256's transformer/config.json names
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DITKIT_FILE = "ditkit.json"  # what diffusers has no place for: the objective, the data, the run's origin
EXPORT_TOLERANCE = 1e-5  # max |ditkit - diffusers| on the probe inputs, fp32
IMPORT_TOLERANCE = 1e-4  # relative to the output's scale; covers the MLP norm's epsilon (see the docstring)
NORM_EPS = 1e-6  # every LayerNorm of ditkit's DiT
DIFFUSERS_TIME_FREQ_SHIFT = 1  # diffusers' DiT: Timesteps(downscale_freq_shift=1)
MLP_RATIO = 4.0  # diffusers' FeedForward: int(4 * dim) hidden units
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# -----------------------------------------------------------------------------------------------
# configs
# -----------------------------------------------------------------------------------------------
def check_exportable(cfg: DiTConfig) -> None:
    """Raise UsageError naming every DiT config field that diffusers' DiTTransformer2DModel cannot hold."""
    problems = []
    if cfg.time_freq_shift != DIFFUSERS_TIME_FREQ_SHIFT:
        problems.append(
            f"time_freq_shift={cfg.time_freq_shift}: this DiT embeds the timestep at the frequencies "
            "10000^(-i/128) (facebookresearch/DiT's), diffusers' DiT at 10000^(-i/127) "
            "(Timesteps(downscale_freq_shift=1)); sinusoids of different frequencies are independent "
            "functions of t, so no weights map one onto the other. Fine-tune it on its own data with "
            "diffusers' frequencies to make an exportable model: ditkit finetune --from RUN --dataset "
            "mnist|FOLDER --time-freq-shift 1 --out NEW_RUN")
    if cfg.pos_embed != "sincos":
        problems.append(f"pos_embed={cfg.pos_embed!r}: diffusers' PatchEmbed recomputes a fixed sin-cos table "
                        "from sample_size and does not load a learned one")
    if cfg.norm != "layernorm":
        problems.append(f"norm={cfg.norm!r}: diffusers' DiT blocks normalise with LayerNorm")
    if cfg.qk_norm:
        problems.append("qk_norm=True: diffusers' DiT attention has no query/key normalisation")
    if cfg.mlp != "gelu":
        problems.append(f"mlp={cfg.mlp!r}: diffusers' DiT MLP is a GELU MLP of 4x the width")
    if cfg.rope:
        problems.append("rope=True: diffusers' DiT has no rotary position angles")
    if cfg.mlp_ratio != MLP_RATIO:
        problems.append(f"mlp_ratio={cfg.mlp_ratio}: diffusers' DiT MLP is {MLP_RATIO:g}x hidden_size wide")
    if problems:
        raise UsageError("diffusers' DiTTransformer2DModel cannot represent this model: " + "; ".join(problems))


def diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """The DiTTransformer2DModel constructor arguments of an exportable DiT config."""
    check_exportable(cfg)
    C = cfg.in_channels
    return dict(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads, in_channels=C,
        out_channels=2 * C if cfg.learn_sigma else C, num_layers=cfg.depth, dropout=0.0, attention_bias=True,
        sample_size=cfg.input_size, patch_size=cfg.patch_size,
        activation_fn="gelu-approximate" if cfg.gelu_approximate == "tanh" else "gelu",
        # diffusers' label table has num_embeds_ada_norm + 1 rows (the last one its null class, as ditkit's);
        # an unconditional DiT becomes one class whose rows are zero: class_labels carry nothing
        num_embeds_ada_norm=max(cfg.num_classes, 1), upcast_attention=False, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, norm_eps=NORM_EPS)


def _ditkit_config(dcfg: dict[str, Any], unconditional: bool, where: str) -> DiTConfig:
    """The DiT config of a DiTTransformer2DModel config (refusing what ditkit's DiT cannot hold)."""
    def get(key: str, default: Any = None) -> Any:
        return dcfg.get(key, default)

    problems = []
    if get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        problems.append(f"norm_type={get('norm_type')!r}: ditkit's DiT is adaLN-Zero ('ada_norm_zero')")
    if get("norm_elementwise_affine", False):
        problems.append("norm_elementwise_affine=true: ditkit's DiT norms have no gain or bias of their own")
    if not get("attention_bias", True):
        problems.append("attention_bias=false: ditkit's attention maps have biases")
    act = get("activation_fn", "gelu-approximate")
    if act not in ("gelu", "gelu-approximate"):
        problems.append(f"activation_fn={act!r}: ditkit's DiT MLP is 'gelu' or 'gelu-approximate'")
    if get("patch_size") is None:
        problems.append("patch_size=null: ditkit's DiT is a patch transformer")
    C = int(get("in_channels", 4))
    out_c = get("out_channels") or C
    if out_c not in (C, 2 * C):
        problems.append(f"out_channels={out_c}: ditkit's DiT predicts in_channels ({C}) channels, or twice "
                        "as many with a learned variance (learn_sigma)")
    if problems:
        raise UsageError(f"{where}: ditkit's DiT cannot represent this model: " + "; ".join(problems))
    heads, head_dim = int(get("num_attention_heads", 16)), int(get("attention_head_dim", 72))
    try:
        return DiTConfig(
            input_size=int(get("sample_size", 32)), in_channels=C, patch_size=int(get("patch_size")),
            hidden_size=heads * head_dim, depth=int(get("num_layers", 28)), num_heads=heads, mlp_ratio=MLP_RATIO,
            num_classes=0 if unconditional else int(get("num_embeds_ada_norm") or 0), pos_embed="sincos",
            gelu_approximate="tanh" if act == "gelu-approximate" else "none",
            time_freq_shift=DIFFUSERS_TIME_FREQ_SHIFT, learn_sigma=out_c == 2 * C).validate()
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


# -----------------------------------------------------------------------------------------------
# weights
# -----------------------------------------------------------------------------------------------
def to_diffusers(net: DiT) -> dict[str, torch.Tensor]:
    """ditkit DiT weights -> a DiTTransformer2DModel state dict (fp32, every tensor its own copy)."""
    check_exportable(net.config)
    sd = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    c = net.config
    D = c.hidden_size
    # (K + 1, D), row K the null class; an unconditional net: one class, both rows zero
    table = sd["y_embedder.table.weight"] if c.num_classes else torch.zeros(2, D)
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(c.depth):
        p, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = p + "norm1.emb."
        for kind in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{kind}"] = sd[f"t_embedder.mlp.0.{kind}"]
            out[emb + f"timestep_embedder.linear_2.{kind}"] = sd[f"t_embedder.mlp.2.{kind}"]
            out[p + f"norm1.linear.{kind}"] = sd[b + f"adaLN_modulation.1.{kind}"]
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3, dim=0)  # qkv's rows: all of q, then k, then v
            out[p + f"attn1.to_q.{kind}"], out[p + f"attn1.to_k.{kind}"], out[p + f"attn1.to_v.{kind}"] = q, k, v
            out[p + f"attn1.to_out.0.{kind}"] = sd[b + f"attn.proj.{kind}"]
            out[p + f"ff.net.0.proj.{kind}"] = sd[b + f"mlp.fc1.{kind}"]
            out[p + f"ff.net.2.{kind}"] = sd[b + f"mlp.fc2.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = table
    # safetensors refuses tensors that share memory (the per-block copies of the embedders)
    return {k: v.clone().contiguous() for k, v in out.items()}


def from_diffusers(sd: dict[str, torch.Tensor], dcfg: dict[str, Any],
                   where: str = "transformer") -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """A DiTTransformer2DModel state dict and config -> (ditkit DiT config, its state dict)."""
    depth = int(dcfg.get("num_layers", 28))

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise DitkitError(f"{where}: weight {key!r} is missing (not a DiTTransformer2DModel of "
                              f"{depth} layers as its config.json says)")
        return sd[key].float()

    emb0 = "transformer_blocks.0.norm1.emb."
    table = take(emb0 + "class_embedder.embedding_table.weight")
    K = int(dcfg.get("num_embeds_ada_norm") or 0)
    if table.shape[0] != K + 1:
        raise DitkitError(f"{where}: the class table has {table.shape[0]} rows; ditkit needs "
                          f"num_embeds_ada_norm + 1 = {K + 1} (the last one the null class: class_dropout_prob > 0)")
    unconditional = K == 1 and not table.any()  # how `to_diffusers` writes an unconditional DiT
    cfg = _ditkit_config(dcfg, unconditional, where)
    # ditkit shares one condition embedder; diffusers keeps a copy per block (and the final layer reads block 0's)
    shared = [k[len(emb0):] for k in sd if k.startswith(emb0)]
    for i in range(1, depth):
        for name in shared:
            if not torch.equal(take(f"transformer_blocks.{i}.norm1.emb.{name}"), take(emb0 + name)):
                raise DitkitError(f"{where}: transformer_blocks.{i}.norm1.emb.{name} differs from block 0's; "
                                  "ditkit's DiT shares one timestep and label embedder across its blocks")
    out = {"x_embedder.proj.weight": take("pos_embed.proj.weight"), "x_embedder.proj.bias": take("pos_embed.proj.bias"),
           "final_layer.adaLN_modulation.1.weight": take("proj_out_1.weight"),
           "final_layer.adaLN_modulation.1.bias": take("proj_out_1.bias"),
           "final_layer.linear.weight": take("proj_out_2.weight"), "final_layer.linear.bias": take("proj_out_2.bias")}
    for kind in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{kind}"] = take(emb0 + f"timestep_embedder.linear_1.{kind}")
        out[f"t_embedder.mlp.2.{kind}"] = take(emb0 + f"timestep_embedder.linear_2.{kind}")
    if cfg.num_classes:
        out["y_embedder.table.weight"] = table
    for i in range(depth):
        p, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"adaLN_modulation.1.{kind}"] = take(p + f"norm1.linear.{kind}")
            out[b + f"attn.qkv.{kind}"] = torch.cat([take(p + f"attn1.to_{n}.{kind}") for n in "qkv"])
            out[b + f"attn.proj.{kind}"] = take(p + f"attn1.to_out.0.{kind}")
            out[b + f"mlp.fc1.{kind}"] = take(p + f"ff.net.0.proj.{kind}")
            out[b + f"mlp.fc2.{kind}"] = take(p + f"ff.net.2.{kind}")
    used = set()
    for i in range(depth):
        used |= {f"transformer_blocks.{i}.norm1.emb.{n}" for n in shared}
    leftover = sorted(k for k in sd if k not in used and not _mapped(k, depth))
    if leftover:
        raise DitkitError(f"{where}: weights ditkit's DiT has no place for: {', '.join(leftover[:5])}"
                          f"{' ...' if len(leftover) > 5 else ''}")
    return cfg, out


def _mapped(key: str, depth: int) -> bool:
    """Whether `from_diffusers` reads this DiTTransformer2DModel key (besides the embedders)."""
    if key in ("pos_embed.proj.weight", "pos_embed.proj.bias", "proj_out_1.weight", "proj_out_1.bias",
               "proj_out_2.weight", "proj_out_2.bias"):
        return True
    parts = key.split(".", 2)
    if len(parts) < 3 or parts[0] != "transformer_blocks" or not parts[1].isdigit() or int(parts[1]) >= depth:
        return False
    return parts[2] in {f"{m}.{kind}" for kind in ("weight", "bias") for m in (
        "norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}


# -----------------------------------------------------------------------------------------------
# checking one network against the other
# -----------------------------------------------------------------------------------------------
def time_range(objective_config: dict[str, Any]) -> float:
    """The largest time the objective feeds the network: DDPM's T - 1, the interpolants' 1000 t at t = 1."""
    if objective_config.get("name") == "ddpm":
        return float(objective_config.get("num_timesteps", 1000) - 1)
    from ..objectives.interpolant import TIME_SCALE

    return TIME_SCALE


@torch.no_grad()
def max_difference(net: DiT, dmodel, t_max: float, seed: int = 0) -> tuple[float, float]:
    """(max |ditkit - diffusers|, max |ditkit|) over probe inputs: noise images, times across [0, t_max]
    and labels that include the null class. The first C output channels are compared (ditkit's DiT returns
    those; with learn_sigma diffusers' has C more, the variance, copied weight for weight)."""
    c = net.config
    g = torch.Generator().manual_seed(seed)
    B = 4
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.tensor([0.0, 0.31, 0.77, 1.0]) * t_max
    if c.num_classes:
        labels = torch.tensor([0, c.num_classes, (c.num_classes - 1), min(1, c.num_classes - 1)])
        cond = Condition.from_labels(labels, c.num_classes)
    else:
        labels, cond = torch.zeros(B, dtype=torch.long), Condition.none(B)
    net = net.float().eval()
    ours = net(x, t, cond)
    theirs = dmodel.float().eval()(x, timestep=t, class_labels=labels).sample[:, :c.in_channels]
    return float((ours - theirs).abs().max()), float(ours.abs().max())


# -----------------------------------------------------------------------------------------------
# export
# -----------------------------------------------------------------------------------------------
def _fresh_folder(out: Path, flag: str) -> Path:
    """A hidden temporary sibling of `out` to fill, after checking that `out` may be written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{flag} {out}: already exists and is not empty; pick a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (an empty `out` is replaced)."""
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def _scheduler(objective_config: dict[str, Any]):
    """The diffusers scheduler that runs the exported network as ditkit's objective trained it, or None where
    diffusers has none: DDPM (any of its schedulers share the config) and the linear path's velocity (flow
    matching with shift 1). Not with a centred objective (data_mean): its network learns x - mean."""
    o = objective_config
    if o.get("data_mean") is not None:
        return None
    if o.get("name") == "ddpm":
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=o["num_timesteps"], beta_start=o["beta_start"],
                             beta_end=o["beta_end"], beta_schedule=SCHEDULE_TO_DIFFUSERS[o["schedule"]],
                             prediction_type=PREDICTION_TO_DIFFUSERS[o["prediction"]], clip_sample=False)
    if o.get("name") == "linear" and o.get("prediction") == "velocity":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return None


def export_diffusers(run: str | os.PathLike, out: str | os.PathLike, *, weights: str = "ema") -> dict[str, Any]:
    """Write RUN's network as a diffusers DiTTransformer2DModel folder `out`:

        out/config.json, out/diffusion_pytorch_model.safetensors   DiTTransformer2DModel.from_pretrained(out)
        out/scheduler/scheduler_config.json                         where diffusers has the objective's scheduler
        out/ditkit.json                                            the objective, data and run (for `ditkit import`)
        out/README.md                                              the model card; out/samples.png the run's last grid

    The folder is written aside and moved into place only once it loads in diffusers and agrees with ditkit's
    network within EXPORT_TOLERANCE: nothing half-written is left. Returns {"out", "max_abs_diff", ...}."""
    from ..runs import load_model

    model = load_model(run, weights=weights, device="cpu")
    if model.family != "dit":
        raise UsageError(f"{run}: a {model.family!r} run; diffusers' DiTTransformer2DModel holds DiT runs only")
    net = model.net
    dcfg = diffusers_config(net.config)  # refuses, naming the fields, before anything is written
    out = Path(out)
    tmp = _fresh_folder(out, "--out")
    try:
        from diffusers import DiTTransformer2DModel

        dmodel = DiTTransformer2DModel(**dcfg)
        dmodel.load_state_dict(to_diffusers(net), strict=True)
        dmodel.save_pretrained(tmp, safe_serialization=True)
        reloaded = DiTTransformer2DModel.from_pretrained(tmp)
        t_max = time_range(model.config["objective"])
        diff, scale = max_difference(net, reloaded, t_max)
        if not diff <= EXPORT_TOLERANCE:
            raise DitkitError(f"export check failed: diffusers' network differs from ditkit's by {diff:.3g} "
                              f"(allowed {EXPORT_TOLERANCE:g}); nothing was written to {out}")
        scheduler = _scheduler(model.config["objective"])
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
        grid = _last_grid(model.run_dir)
        if grid is not None:
            shutil.copyfile(grid, tmp / "samples.png")
        record = {"ditkit_version": __version__, "source_run": str(model.run_dir), "checkpoint": str(model.checkpoint),
                  "step": model.step, "weights": weights, "family": "dit", "model": net.config.to_dict(),
                  "objective": model.config["objective"], "data": model.config.get("data", {}),
                  "train": model.config.get("train", {}), "time_input": _time_input(model.config["objective"]),
                  "max_abs_diff": diff, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / DITKIT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(model, dcfg, diff, scale, weights, grid is not None,
                                                  scheduler is not None))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "max_abs_diff": diff, "output_scale": scale, "step": model.step}


def _last_grid(run_dir: Optional[Path]) -> Optional[Path]:
    grids = sorted((Path(run_dir) / "samples").glob("step_*.png")) if run_dir else []
    return grids[-1] if grids else None


def _time_input(o: dict[str, Any]) -> str:
    """What the exported network's `timestep` argument means under the objective that trained it."""
    if o.get("name") == "ddpm":
        return (f"the DDPM step t in [0, {o['num_timesteps'] - 1}] (fractional values allowed) of a {o['schedule']} "
                f"beta schedule ({o['beta_start']:g} to {o['beta_end']:g} over {o['num_timesteps']} steps): "
                f"x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the output is the {o['prediction']} prediction")
    return (f"1000 t for t in [0, 1] on the {o.get('name')!r} interpolant path (t = 0 data, t = 1 noise; "
            f"x_t = alpha(t) x0 + s(t) eps, see ditkit/objectives/interpolant.py); the output is the "
            f"{o.get('prediction')} prediction")


def model_card(model, dcfg: dict[str, Any], diff: float, scale: float, weights: str, has_grid: bool,
               has_scheduler: bool) -> str:
    """README.md of an exported folder: what the network is, how to call it, how it was trained, its figures."""
    cfg, o = model.net.config, model.config["objective"]
    data, train = model.config.get("data", {}), model.config.get("train", {})
    C, S = cfg.in_channels, cfg.input_size
    K = cfg.num_classes
    names = data.get("class_names") or []
    lines = ["---", "library_name: diffusers", "tags: [ditkit, dit, diffusion, class-conditional]" if K else
             "tags: [ditkit, dit, diffusion, unconditional]", "---", "",
             f"# {model.config.get('model_name', 'DiT')} exported from ditkit", "",
             f"A Diffusion Transformer (Peebles & Xie 2023) trained with ditkit {model.config.get('ditkit_version', '')} "
             f"on `{data.get('name', '?')}` ({C}x{S}x{S} images in [-1, 1]), exported as a diffusers "
             f"`{DIFFUSERS_CLASS}` ({weights} weights of step {model.step}).", "",
             "```python", "import torch", "from diffusers import DiTTransformer2DModel", "",
             'net = DiTTransformer2DModel.from_pretrained("THIS_FOLDER")',
             f"x = torch.randn(1, {C}, {S}, {S})  # x_t",
             f"out = net(x, timestep=torch.tensor([500.0]), class_labels=torch.tensor([{0 if K else 0}])).sample",
             "```", "",
             f"- `timestep`: {_time_input(o)}.",
             (f"- `class_labels`: 0..{K - 1} ({', '.join(f'{i} = {n}' for i, n in enumerate(names[:20]))}"
              f"{', ...' if len(names) > 20 else ''}); {K} is the null class of classifier-free guidance."
              if K else "- `class_labels`: the model is unconditional; pass 0 (its label table is zero)."),
             f"- output: {dcfg['out_channels']} channels" + (f", the first {C} the prediction, the rest a learned variance"
                                                           if cfg.learn_sigma else ", the prediction") + ".",
             ]
    if o.get("data_mean") is not None:
        lines.append("- the network learns images minus the training set's mean image (ditkit.json: "
                     "objective.data_mean): add it back to x0 estimates.")
    if has_scheduler:
        lines.append("- `scheduler/` holds the diffusers scheduler of the training objective.")
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    shown = {"model": model.config.get("model_name"), "objective": o.get("name"), "prediction": o.get("prediction"),
             "dataset": data.get("name"), "images": data.get("num_images"), "steps": model.step,
             **{k: train.get(k) for k in ("batch_size", "lr", "optimizer", "max_minutes", "ema_decay", "seed")}}
    lines += [f"| {k} | {v} |" for k, v in shown.items() if v is not None]
    lines += ["", "## Figures", "",
              f"- export check: max |diffusers - ditkit| = {diff:.2e} on probe inputs (output scale {scale:.2f}, "
              f"fp32; required <= {EXPORT_TOLERANCE:g})."]
    last = _last_metrics(model.run_dir)
    if last:
        lines.append(f"- training loss (average of the last logged window) {last.get('loss_avg', float('nan')):.4f} "
                     f"at step {last.get('step')}, after {last.get('elapsed_s', 0) / 60:.1f} minutes.")
    for name, res in _evaluations(model.run_dir):
        figs = ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and k in ("fid", "accuracy", "class_accuracy", "nfe", "num"))
        if figs:
            lines.append(f"- `ditkit eval` ({name}): {figs}.")
    if has_grid:
        lines += ["", "![samples from the run's last grid](samples.png)"]
    lines += ["", f"Exported by `ditkit export` ({DITKIT_FILE} holds the full ditkit config; "
                  "`ditkit import THIS_FOLDER --out RUN` makes a ditkit run of it again).", ""]
    return "\n".join(lines)


def _last_metrics(run_dir: Optional[Path]) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.exists():
        return {}
    last = {}
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line)
        except ValueError:
            break
    return last


def _evaluations(run_dir: Optional[Path]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in sorted((Path(run_dir) / "eval").glob("*.json")) if run_dir else []:
        try:
            out.append((p.stem, json.loads(p.read_text())))
        except ValueError:
            continue
    return out[-3:]


# -----------------------------------------------------------------------------------------------
# import
# -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DitkitError(f"{path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise DitkitError(f"{path}: must be a JSON object")
    return d


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers model folder's weights: one safetensors file or a sharded set. Pickled `.bin` weights are
    refused (loading them runs code)."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise DitkitError(f"{path}: unreadable safetensors ({e})") from None

    if (folder / WEIGHTS_FILE).exists():
        return load(folder / WEIGHTS_FILE)
    if (folder / WEIGHTS_INDEX).exists():
        shards = sorted(set(_read_json(folder / WEIGHTS_INDEX).get("weight_map", {}).values()))
        if not shards:
            raise DitkitError(f"{folder / WEIGHTS_INDEX}: its weight_map is empty")
        out: dict[str, torch.Tensor] = {}
        for name in shards:
            out.update(load(folder / name))
        return out
    if any(folder.glob("*.bin")):
        raise DitkitError(f"{folder}: only pickled .bin weights; ditkit reads safetensors (loading pickles runs "
                          "code): convert with diffusers (from_pretrained, then save_pretrained(safe_serialization=True))")
    raise DitkitError(f"{folder}: no {WEIGHTS_FILE} (nor a sharded {WEIGHTS_INDEX})")


def _objective_from_scheduler(sc: dict[str, Any], where: Path) -> dict[str, Any]:
    """ditkit's objective config for a diffusers scheduler config (DDPM-family schedulers, flow matching)."""
    from ..objectives import build_objective

    name = sc.get("_class_name", "")
    if name.startswith("FlowMatch"):
        if sc.get("shift", 1.0) != 1.0 or sc.get("use_dynamic_shifting"):
            raise DitkitError(f"{where}: {name} with a time shift; ditkit's linear path has none")
        return build_objective({"name": "linear", "prediction": "velocity"}).config()
    if sc.get("trained_betas") is not None:
        raise DitkitError(f"{where}: trained_betas; ditkit's DDPM objective has linear and cosine beta schedules")
    schedules = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
    predictions = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
    bs, pt = sc.get("beta_schedule", "linear"), sc.get("prediction_type", "epsilon")
    if bs not in schedules:
        raise DitkitError(f"{where}: beta_schedule {bs!r}; ditkit's DDPM objective has {', '.join(schedules)}")
    if pt not in predictions:
        raise DitkitError(f"{where}: prediction_type {pt!r}; allowed {', '.join(predictions)}")
    return build_objective({"name": "ddpm", "num_timesteps": int(sc.get("num_train_timesteps", 1000)),
                            "schedule": schedules[bs], "beta_start": float(sc.get("beta_start", 1e-4)),
                            "beta_end": float(sc.get("beta_end", 0.02)), "prediction": predictions[pt]}).config()


# facebookresearch/DiT's training objective (and diffusers' DiT pipelines'): DDPM, 1000 linear betas, eps
FACEBOOK_DIT_OBJECTIVE = {"name": "ddpm", "num_timesteps": 1000, "schedule": "linear", "beta_start": 1e-4,
                          "beta_end": 0.02, "prediction": "eps"}


def import_diffusers(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Make a ditkit run folder `out` from a diffusers DiT: a DiTTransformer2DModel folder, or a pipeline
    folder with transformer/ (and vae/ when the model is latent, scheduler/ for its objective), as
    facebook/DiT-XL-2-256 is laid out. The objective comes from ditkit.json (an export of ditkit's), else
    from scheduler/, else it is facebookresearch/DiT's (DDPM, 1000 linear betas, eps). A latent model's
    AutoencoderKL is copied into out/vae and `config.json["vae"]` says how to decode its samples.
    Written aside and moved into place when complete. Returns {"out", "max_abs_diff", ...}."""
    src = Path(src)
    if not src.is_dir():
        raise DitkitError(f"{src}: no such folder (give a diffusers model or pipeline folder)")
    tdir = src / "transformer" if (src / "transformer" / "config.json").exists() else src
    if not (tdir / "config.json").exists():
        raise DitkitError(f"{src}: not a diffusers model folder (no config.json, nor transformer/config.json)")
    dcfg = _read_json(tdir / "config.json")
    cls = dcfg.get("_class_name")
    if cls not in (DIFFUSERS_CLASS, LEGACY_CLASS):
        raise DitkitError(f"{tdir / 'config.json'}: _class_name {cls!r}; ditkit imports {DIFFUSERS_CLASS}")
    cfg, sd = from_diffusers(_read_weights(tdir), dcfg, where=str(tdir))
    net = DiT(cfg)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise DitkitError(f"{tdir}: weights do not match its config.json ({str(e)[:200]})") from None
    record = _read_json(src / DITKIT_FILE) if (src / DITKIT_FILE).exists() else (
        _read_json(tdir / DITKIT_FILE) if (tdir / DITKIT_FILE).exists() else {})
    sched = next((p for p in (src / "scheduler" / "scheduler_config.json", tdir / "scheduler" / "scheduler_config.json")
                  if p.exists()), None)
    if "objective" in record:
        objective, origin = record["objective"], "ditkit.json"
    elif sched is not None:
        objective, origin = _objective_from_scheduler(_read_json(sched), sched), str(sched.relative_to(src))
    else:
        objective, origin = dict(FACEBOOK_DIT_OBJECTIVE), "facebookresearch/DiT's (no scheduler/ given)"
    vae_dir = src / "vae" if (src / "vae" / "config.json").exists() else None
    vae_section = _vae_section(vae_dir, cfg) if vae_dir is not None else None
    data = dict(record.get("data") or {})
    if not data:
        names = _class_names(src, cfg.num_classes)
        shape = vae_section["image_shape"] if vae_section else [cfg.in_channels, cfg.input_size, cfg.input_size]
        data = {"name": f"diffusers:{src.name}", "shape": shape, "num_classes": cfg.num_classes,
                "class_names": names, "num_images": 0, "class_counts": []}

    from diffusers import DiTTransformer2DModel

    dmodel = DiTTransformer2DModel.from_pretrained(tdir)
    diff, scale = max_difference(net, dmodel, time_range(objective))
    if not diff <= IMPORT_TOLERANCE * max(1.0, scale):
        raise DitkitError(f"{tdir}: ditkit's DiT differs from diffusers' by {diff:.3g} on probe inputs "
                          f"(allowed {IMPORT_TOLERANCE:g} x the output scale {scale:.3g}); not imported")
    out = Path(out)
    tmp = _fresh_folder(out, "--out")
    try:
        from ..runs import save_checkpoint
        from ..utils import atomic_write_json

        config = {"ditkit_version": __version__, "family": "dit",
                  "model_name": record.get("train", {}).get("model") or f"{DIFFUSERS_CLASS} ({src.name})",
                  "model": cfg.to_dict(), "objective": objective, "train": record.get("train", {}), "data": data,
                  "import": {"source": str(src.resolve()), "format": "diffusers", "class": cls,
                             "objective_from": origin, "max_abs_diff": diff, "output_scale": scale,
                             "norm_eps": dcfg.get("norm_eps", 1e-5)}}
        if vae_section is not None:
            config["vae"] = vae_section
            _copy_model_folder(vae_dir, tmp / vae_section["folder"])
        atomic_write_json(tmp / "config.json", config)
        save_checkpoint(tmp, int(record.get("step", 0)), net, None, None, {"role": "import", "epoch": 0, "pos": 0}, {})
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "max_abs_diff": diff, "output_scale": scale, "objective_from": origin,
            "latent": vae_section is not None}


def _class_names(src: Path, K: int) -> list[str]:
    """Class names from a DiT pipeline's model_index.json `id2label` where it has one, else the ids."""
    index = src / "model_index.json"
    names = [str(i) for i in range(K)]
    if index.exists():
        id2label = _read_json(index).get("id2label") or {}
        for k, v in id2label.items():
            if str(k).isdigit() and int(k) < K:
                names[int(k)] = str(v).split(",")[0].strip()
    return names


def _vae_section(vae_dir: Path, cfg: DiTConfig) -> dict[str, Any]:
    """config.json["vae"] of a latent model: where its AutoencoderKL is and the shapes on either side."""
    vcfg = _read_json(vae_dir / "config.json")
    if vcfg.get("_class_name") != "AutoencoderKL":
        raise DitkitError(f"{vae_dir / 'config.json'}: _class_name {vcfg.get('_class_name')!r}; ditkit decodes "
                          "latents with diffusers' AutoencoderKL")
    latent_c = int(vcfg.get("latent_channels", 4))
    if latent_c != cfg.in_channels:
        raise DitkitError(f"{vae_dir / 'config.json'}: latent_channels {latent_c}, but the transformer takes "
                          f"{cfg.in_channels} channels")
    factor = 2 ** (len(vcfg.get("block_out_channels", [64])) - 1)  # one downsampling per block but the last
    return {"folder": "vae", "class": "AutoencoderKL", "scaling_factor": float(vcfg.get("scaling_factor", 0.18215)),
            "latent_shape": [latent_c, cfg.input_size, cfg.input_size],
            "image_shape": [int(vcfg.get("out_channels", 3)), cfg.input_size * factor, cfg.input_size * factor]}


def _copy_model_folder(src: Path, dst: Path) -> None:
    """A diffusers model folder's config and safetensors weights (nothing pickled)."""
    _read_weights(src)  # refuses .bin-only and unreadable weights before copying
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and (p.name == "config.json" or p.name.endswith(".safetensors") or p.name == WEIGHTS_INDEX):
            shutil.copyfile(p, dst / p.name)


class LatentDecoder:
    """A latent run's decoder: latents (B, C_lat, h, w) as the sampler ends them -> images (B, C, H, W) in
    [-1, 1], through the run's AutoencoderKL (Rombach et al. 2022): x = vae.decode(z / scaling_factor)."""

    def __init__(self, run_dir: Path, section: dict[str, Any], device: torch.device):
        from diffusers import AutoencoderKL

        folder = Path(run_dir) / section["folder"]
        if not (folder / "config.json").exists():
            raise DitkitError(f"{folder}: the run's VAE folder is missing (config.json 'vae' names it)")
        self.vae = AutoencoderKL.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.scaling_factor = float(section["scaling_factor"])
        self.image_shape = tuple(section["image_shape"])

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z.to(self.vae.dtype) / self.scaling_factor).sample
        return x.float().clamp(-1, 1)
